"""Neural audio codecs: audio in, integer codes out (DAC, EnCodec), streaming, conversion of published weights."""
