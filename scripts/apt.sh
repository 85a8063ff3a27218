# apt_get ARGS...: apt-get as root (through sudo when not root), non-interactive,
# waiting for another apt or dpkg process (unattended-upgrades, a second install)
# to release apt's locks instead of failing: up to APT_LOCK_WAIT_S seconds (600).
# Sourced by install.sh.

apt_get() {
  local wait_s=${APT_LOCK_WAIT_S:-600}
  local deadline=$((SECONDS + wait_s)) out status said=0
  local sudo_cmd=()
  [[ $(id -u) -ne 0 ]] && sudo_cmd=(sudo)
  while true; do
    status=0
    # DPkg::Lock::Timeout makes apt itself wait for the dpkg lock; the loop covers
    # the locks it does not wait for (the package lists, the archive cache).
    out=$("${sudo_cmd[@]}" env DEBIAN_FRONTEND=noninteractive \
          apt-get -o DPkg::Lock::Timeout="$wait_s" "$@" 2>&1) || status=$?
    if (( status == 0 )); then
      [[ -n "$out" ]] && printf '%s\n' "$out"
      return 0
    fi
    if ! grep -qiE 'could not get lock|unable to acquire the dpkg frontend lock|is another process using it' <<<"$out" \
       || (( SECONDS >= deadline )); then
      printf '%s\n' "$out" >&2
      return "$status"
    fi
    if (( ! said )); then
      echo "waiting for another apt/dpkg process to release its lock (up to ${wait_s} s) ..."
      said=1
    fi
    sleep 3
  done
}
