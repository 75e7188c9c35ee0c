# Shared by scripts/demo and scripts/test (sourced, not run): Debian packages and the .venv.
# shellcheck shell=bash

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# The systemd enablement state that package installs touch: symlinks under /etc/systemd/system
# and deb-systemd-helper's records. Listed before and after an install to undo what it added.
_enablement_paths() {
  local d
  for d in /etc/systemd/system /var/lib/systemd/deb-systemd-helper-enabled \
           /var/lib/systemd/deb-systemd-helper-masked; do
    if [ -d "$d" ]; then as_root find "$d" -mindepth 1; fi
  done | LC_ALL=C sort
}

_POSTE_POLICY_CREATED=0
_POSTE_ENABLEMENT_BEFORE=""
_undo_install_side_effects() {
  if [ "$_POSTE_POLICY_CREATED" = 1 ]; then
    as_root rm -f /usr/sbin/policy-rc.d
    _POSTE_POLICY_CREATED=0
  fi
  if [ -n "$_POSTE_ENABLEMENT_BEFORE" ]; then
    local added
    added=$(LC_ALL=C comm -13 "$_POSTE_ENABLEMENT_BEFORE" <(_enablement_paths) | LC_ALL=C sort -r)
    if [ -n "$added" ]; then
      # Deepest first: files and symlinks, then the folders the install created for them.
      while IFS= read -r path; do
        if [ -d "$path" ] && [ ! -L "$path" ]; then as_root rmdir "$path" 2>/dev/null || true
        else as_root rm -f "$path"; fi
      done <<<"$added"
      echo "(undid the service enablement the install added: $(echo "$added" | grep -c .) entries)" >&2
    fi
    rm -f "$_POSTE_ENABLEMENT_BEFORE"
    _POSTE_ENABLEMENT_BEFORE=""
  fi
}

# apt_install PKG...: installs those of PKG that are missing, without recommends, and leaves no
# trace beyond the packages: apt starts no daemon (a temporary policy-rc.d, removed after), and
# the services the packages enable on install (knot.service...) are disabled again.
apt_install() {
  local missing="" p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
  done
  [ -n "$missing" ] || return 0
  echo "== installing Debian packages:$missing" >&2
  trap '_undo_install_side_effects' EXIT
  trap '_undo_install_side_effects; exit 130' INT TERM
  _POSTE_ENABLEMENT_BEFORE=$(mktemp)
  _enablement_paths >"$_POSTE_ENABLEMENT_BEFORE"
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# poste scripts: no daemon starts during this install (removed after it)\nexit 101\n' \
      | as_root tee /usr/sbin/policy-rc.d >/dev/null
    as_root chmod 755 /usr/sbin/policy-rc.d
    _POSTE_POLICY_CREATED=1
  fi
  local rc=0 log
  log=$(mktemp)
  if [ -n "$(dpkg --audit 2>/dev/null)" ]; then  # an install interrupted earlier: finish it first
    as_root env DEBIAN_FRONTEND=noninteractive dpkg --configure -a >"$log" 2>&1 || true
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >"$log" 2>&1 || { rc=$?; cat "$log" >&2; }
  if [ "$rc" = 0 ]; then
    # shellcheck disable=SC2086
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $missing \
      >"$log" 2>&1 || { rc=$?; tail -n 30 "$log" >&2; }
  fi
  rm -f "$log"
  _undo_install_side_effects
  trap - EXIT INT TERM
  return "$rc"
}

# The Python the venvs are made with: Debian's own /usr/bin/python3 (the one python3-venv is
# installed for) when there is one new enough (3.11, as pyproject.toml asks), even if another
# python3 (pyenv's, a self-built one) comes first on PATH; POSTE_PYTHON chooses another. Why:
# such builds are usually made without PGO and LTO (pyenv's default), and everything poste does
# in Python runs slower on them: `poste spam
# classify -j1` on the spam benchmark's 8,120-mail mbox took 1.40-1.44 s of CPU on pyenv's 3.11.7
# and 1.20-1.26 s on Debian 12's 3.11.2, the same code (2026-12-04).
POSTE_PYTHON=${POSTE_PYTHON:-}
if [ -z "$POSTE_PYTHON" ]; then
  if [ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    POSTE_PYTHON=/usr/bin/python3
  else
    POSTE_PYTHON=python3
  fi
fi

# make_venv DIR LOCKFILE [PIP-INSTALL-TARGET]: a venv in DIR with exactly the locked dependencies,
# then poste from this clone without dependency resolution (default target: editable, `-e .`).
# DIR/.poste-complete marks a venv whose install finished: one without it (an interrupted or failed
# attempt) is removed and built again, so a half-made venv never breaks the next attempt; so is one
# made with another Python than POSTE_PYTHON (a venv cannot change its interpreter).
make_venv() {
  local venv=$1 lock=$2 target=${3:--e .}
  local stamp version
  version=$("$POSTE_PYTHON" -c 'import sys; print(sys.version)' | head -n 1)
  stamp="$version $target $(sha256sum "$lock" pyproject.toml | cut -c1-16 | tr '\n' ' ')"
  if [ -e "$venv" ] && [ "$("$venv/bin/python" -c 'import sys; print(sys.version)' 2>/dev/null | head -n 1)" != "$version" ]; then
    echo "== $venv was made with another Python than $POSTE_PYTHON ($version): building it again" >&2
    rm -rf "$venv"
  fi
  if [ -e "$venv/.poste-complete" ] && [ "$(cat "$venv/.poste-complete")" = "$stamp" ] \
     && "$venv/bin/python" -c 'import poste' >/dev/null 2>&1; then
    if [ "$target" != "-e ." ]; then  # a copy of the clone: take its current state
      # shellcheck disable=SC2086
      "$venv/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation \
        --force-reinstall $target
    fi
    return 0
  fi
  if [ -e "$venv" ] && ! { [ -e "$venv/.poste-complete" ] && "$venv/bin/python" -c '' >/dev/null 2>&1; }; then
    echo "== $venv is incomplete (an earlier attempt stopped): building it again" >&2
    rm -rf "$venv"
  fi
  [ -d "$venv" ] || "$POSTE_PYTHON" -m venv "$venv"
  rm -f "$venv/.poste-complete"
  # --require-hashes: every package, build tools included, is the one the lock file names. The
  # build tools (setuptools, wheel, packaging) go first, so the packages that come as sources
  # (and poste) build with them (--no-build-isolation), not with whatever a build env fetches.
  local tools
  tools=$(mktemp)
  awk '/^[^ #]/ {keep = ($0 ~ /^(setuptools|wheel|packaging)==/)} keep' "$lock" >"$tools"
  "$venv/bin/pip" install -q --disable-pip-version-check --require-hashes --no-deps -r "$tools"
  rm -f "$tools"
  # uvloop (the default event loop) from its wheel only: its sources need a C compiler and
  # Cython, which a bare Debian lacks; with no wheel for this Python, pip says so in one line.
  "$venv/bin/pip" install -q --disable-pip-version-check --require-hashes --no-deps --use-pep517 \
    --no-build-isolation --only-binary uvloop -r "$lock"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install -q --disable-pip-version-check --no-deps --no-build-isolation $target
  echo "$stamp" >"$venv/.poste-complete"
}
