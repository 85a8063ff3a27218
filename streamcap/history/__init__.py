"""The memory of what was heard: a history store of every window and trigger event.

- :mod:`streamcap.history.records`: the frozen records stored and read back
  (:class:`~streamcap.history.records.WindowRecord`, :class:`~streamcap.history.records.Span`,
  :class:`~streamcap.history.records.SearchHit`, pages of history).
- :mod:`streamcap.history.store`: the :class:`~streamcap.history.store.HistoryStore`
  interface every backend implements (SQLite by default; a server database later).
"""
