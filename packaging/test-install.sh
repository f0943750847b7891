#!/usr/bin/env bash
# The install test: installs the .deb packages that `make package` built (with dpkg), beside
# the Unicorn CPU emulator's libunicorn2 and libunicorn-dev (from apt), then
#
#   - checks the users, groups, directories and units the packages set up, and that no file of
#     ours is the emulator's, nor its SONAME resolvable system-wide;
#   - starts the installed /usr/bin/unicornd in system mode on a temporary socket (group
#     `unicorn`, mode 0660), and through socket activation as user `unicornd`;
#   - builds a C program with `pkg-config --cflags --libs unicorn-npu` and runs it, the C API
#     test and the CLI as a member of `unicorn` (admitted) and as a user outside it (refused,
#     with a message that names the group);
#   - removes (the policy file stays), purges, and checks that nothing is left behind.
#
# It changes the machine, so it runs only as root (CI runs as root), and it restores what it
# changed: the packages it installed are purged, its users removed, and the users and groups
# the packages created are removed when they did not exist before. It skips (exit 0, saying
# why) when not root or not on a dpkg system.

# The checks run small shell snippets with their data as arguments ($1...), in single quotes.
# shellcheck disable=SC2016
set -euo pipefail
cd "$(dirname "$0")/.."

say() { echo "test-install: $*" >&2; }
if [ "$(id -u)" -ne 0 ]; then
  say "SKIPPED: needs root (it installs packages and creates users); CI runs it as root"
  exit 0
fi
for tool in dpkg apt-get systemd-sysusers systemd-analyze systemd-socket-activate setpriv \
  useradd pkg-config; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    say "SKIPPED: $tool is missing (a Debian system with scripts/install-deps run has it)"
    exit 0
  fi
done

pkgs=$(realpath -m "${CARGO_TARGET_DIR:-target}")/packages
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
ma=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null)
ours=(unicorn-npu libunicorn-npu1 libunicorn-npu-dev)
emulator=(libunicorn2 libunicorn-dev)
debs=()
for p in "${ours[@]}"; do
  debs+=("$pkgs/${p}_${version}-1_${arch}.deb")
  if [ ! -f "${debs[-1]}" ]; then
    say "${debs[-1]} is missing: run make package first"
    exit 1
  fi
done
user_in=unicorn-it-member
user_out=unicorn-it-outsider
marker=/var/lib/unicorn-npu-install-test
ldconf=/etc/ld.so.conf.d/zz-unicorn-npu-install-test.conf

not() { ! "$@"; }
installed() { [ "$(dpkg-query -W -f '${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }
present() { dpkg-query -W -f '${db:Status-Status}' "$1" 2>/dev/null | grep -qv '^not-installed$'; }

# A previous run that was killed leaves its marker: clean up after it. Packages of ours that
# were installed by someone else are left alone, and the test refuses to run.
if [ -f "$marker" ]; then
  say "cleaning up after an interrupted run"
  dpkg --purge "${ours[@]}" >/dev/null 2>&1 || true
  # shellcheck disable=SC1090
  . "$marker"
  # shellcheck disable=SC2086
  [ -z "${emulator_installed_by_test:-}" ] || dpkg --purge $emulator_installed_by_test >/dev/null 2>&1 || true
  for u in $user_in $user_out ${users_created:-}; do userdel "$u" >/dev/null 2>&1 || true; done
  for g in ${groups_created:-}; do groupdel "$g" >/dev/null 2>&1 || true; done
  rm -f "$marker" "$ldconf"
  ldconfig
fi
for p in "${ours[@]}"; do
  if present "$p"; then
    say "$p is already installed on this machine (not by this test): not touching it"
    exit 1
  fi
done

# What this test may have to undo.
users_created=""
groups_created=""
getent passwd unicornd >/dev/null || users_created+=" unicornd"
for g in unicorn render unicornd; do getent group "$g" >/dev/null || groups_created+=" $g"; done
emulator_installed_by_test=""
for p in "${emulator[@]}"; do installed "$p" || emulator_installed_by_test+=" $p"; done
cat >"$marker" <<EOF
users_created="$users_created"
groups_created="$groups_created"
emulator_installed_by_test="$emulator_installed_by_test"
EOF

tmp=$(mktemp -d /tmp/unicorn-install-test.XXXXXX)
chmod 755 "$tmp"
pids=()
cleanup() {
  local rc=$?
  set +e
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  done
  for p in "${ours[@]}"; do
    if present "$p"; then dpkg --purge "${ours[@]}" >/dev/null 2>&1; break; fi
  done
  if [ -n "$emulator_installed_by_test" ]; then
    # shellcheck disable=SC2086
    dpkg --purge $emulator_installed_by_test >/dev/null 2>&1
  fi
  for u in $user_in $user_out $users_created; do
    # Processes the test started as its users (none should be left): by their ids.
    for pid in $(ps -u "$u" -o pid= 2>/dev/null); do kill "$pid" 2>/dev/null; done
    userdel "$u" >/dev/null 2>&1
  done
  for g in $groups_created; do
    getent group "$g" >/dev/null && groupdel "$g" >/dev/null 2>&1
  done
  rm -f "$ldconf" "$marker"
  ldconfig
  rm -rf "$tmp"
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

failures=0
passed=0
ok() {
  passed=$((passed + 1))
  say "ok: $*"
}
fail() {
  failures=$((failures + 1))
  say "FAILED: $*"
}
check() { # check WHAT COMMAND...
  local what=$1
  shift
  if "$@" >"$tmp/check.log" 2>&1; then ok "$what"; else
    fail "$what: $*"
    sed 's/^/    /' "$tmp/check.log" >&2
  fi
}
step() { echo "== test-install: $*" >&2; }
# as USER COMMAND...: runs COMMAND as USER (with the user's groups) in a clean environment.
as() {
  local u=$1
  shift
  setpriv --reuid="$u" --regid="$u" --init-groups \
    env -i PATH=/usr/bin:/bin HOME=/nonexistent LANG=C.UTF-8 "$@"
}

# Snapshot of what is on the disk, to find what removal leaves behind.
snapshot() {
  find /etc /usr /var/lib/systemd /run -xdev \
    \( -path /run/user -o -path /run/systemd/journal -o -path '/run/*/sshd*' \) -prune -o \
    -print 2>/dev/null |
    grep -Ev '^/etc/(passwd|group|shadow|gshadow)-$|^/etc/ld\.so\.cache$' | sort
}

# --- the emulator's packages, then ours -----------------------------------------------------------

step "the Unicorn CPU emulator's libunicorn2 and libunicorn-dev"
if [ -n "$emulator_installed_by_test" ]; then
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq --no-install-recommends "${emulator[@]}" >"$tmp/apt.log" 2>&1; then
    apt-get update -qq >>"$tmp/apt.log" 2>&1 || true
    if ! apt-get install -y -qq --no-install-recommends "${emulator[@]}" >>"$tmp/apt.log" 2>&1; then
      cat "$tmp/apt.log" >&2
      say "could not install ${emulator[*]} from the Debian archive"
      exit 1
    fi
  fi
fi
check "libunicorn2 and libunicorn-dev are installed" installed libunicorn2
before=$(snapshot)

step "dpkg -i ${ours[*]}"
dpkg -i "${debs[@]}" >"$tmp/dpkg.log" 2>&1 || {
  cat "$tmp/dpkg.log" >&2
  fail "dpkg -i"
  exit 1
}
for p in "${ours[@]}" "${emulator[@]}"; do check "$p is installed" installed "$p"; done
check "group unicorn exists" getent group unicorn
check "user unicornd exists" getent passwd unicornd
check "unicornd is in group render" sh -c 'id -nG unicornd | tr " " "\n" | grep -qx render'
check "unicornd is not in group unicorn" not sh -c 'id -nG unicornd | tr " " "\n" | grep -qx unicorn'
check "unicornd has no login shell" sh -c 'getent passwd unicornd | grep -q "nologin$"'
check "/run/unicorn is root's, mode 755 (tmpfiles.d)" \
  test "$(stat -c '%U:%G %a' /run/unicorn)" = "root:root 755"
check "the socket is enabled (sockets.target.wants)" \
  test -L /etc/systemd/system/sockets.target.wants/unicornd.socket
check "/etc/unicorn/unicornd.toml is the default policy" \
  sh -c '/usr/bin/unicornd --print-default-config | cmp -s - /etc/unicorn/unicornd.toml'
check "systemd-analyze verify on the installed units" \
  sh -c 'out=$(systemd-analyze verify /usr/lib/systemd/system/unicornd.socket /usr/lib/systemd/system/unicornd.service 2>&1); echo "$out"; [ -z "$out" ]'
if command -v udevadm >/dev/null 2>&1 && [ -e /sys/class/mem/null ]; then
  # Loads every rule, ours included, and reports the ones that do not parse. It also records
  # the device in udev's database under /run/udev, which the stray-file check below would
  # count against the packages: what it creates there is removed again.
  udev_run=$([ -e /run/udev ] && echo y || true)
  udev_data=$([ -e /run/udev/data ] && echo y || true)
  udev_null=$([ -e /run/udev/data/c1:3 ] && echo y || true)
  udevadm test --action=add /sys/class/mem/null >"$tmp/udev.log" 2>&1 || true
  if [ -z "$udev_run" ]; then
    rm -rf /run/udev
  elif [ -z "$udev_data" ]; then
    rm -rf /run/udev/data
  elif [ -z "$udev_null" ]; then
    rm -f /run/udev/data/c1:3
  fi
  check "udevadm reads 60-unicorn-npu.rules" grep -q 60-unicorn-npu.rules "$tmp/udev.log"
  check "udevadm finds no error in it" sh -c "! grep -i '60-unicorn-npu.rules.*\(invalid\|error\|unknown\)' '$tmp/udev.log'"
fi

step "coexistence with the emulator"
files_of() { dpkg -L "$@" | while read -r f; do [ -d "$f" ] || echo "$f"; done | LC_ALL=C sort -u; }
shared=$(LC_ALL=C comm -12 <(files_of "${ours[@]}") <(files_of "${emulator[@]}"))
check "no file belongs to both ($(files_of "${ours[@]}" | wc -l) of ours, $(files_of "${emulator[@]}" | wc -l) of the emulator's)" \
  sh -c '[ -z "$1" ] || { echo "$1"; false; }' _ "$shared"
check "pkg-config unicorn-npu (ours) and unicorn (the emulator's) both answer" \
  sh -c 'pkg-config --exists unicorn-npu && pkg-config --exists unicorn'
check "the emulator's SONAME libunicorn.so.2 is in the linker cache" \
  sh -c 'ldconfig -p | grep -q "libunicorn.so.2 .*=> .*/'"$ma"'/libunicorn.so.2$"'
check "ours is not in the linker cache (private directory)" sh -c '! ldconfig -p | grep -q unicorn-npu'
cat >"$tmp/emu.c" <<'EOF'
#include <unicorn/unicorn.h>
#include <stdio.h>
int main(void) {
    unsigned major = 0, minor = 0;
    uc_version(&major, &minor);
    printf("emulator %u.%u\n", major, minor);
    return major == 2 ? 0 : 1;
}
EOF
# shellcheck disable=SC2046
check "a program builds and runs against the emulator (pkg-config unicorn)" sh -c \
  "cc '$tmp/emu.c' \$(pkg-config --cflags --libs unicorn) -o '$tmp/emu' && '$tmp/emu'"

step "C programs built with pkg-config --cflags --libs unicorn-npu"
flags=$(pkg-config --cflags --libs unicorn-npu)
say "pkg-config --cflags --libs unicorn-npu: $flags"
# shellcheck disable=SC2086
check "test-client builds" cc -std=c11 -Wall -Wextra -Werror -pedantic packaging/test-client.c \
  $flags -o "$tmp/test-client"
# shellcheck disable=SC2086
check "the C API test builds" cc -std=c11 -Wall -Wextra -Werror -pedantic \
  -D_POSIX_C_SOURCE=200809L tests/c/api_test.c $flags -lm -o "$tmp/api_test"
check "test-client loads libunicorn.so.1 from /usr/lib/$ma/unicorn-npu" \
  sh -c "ldd '$tmp/test-client' | grep -q 'libunicorn.so.1 => /usr/lib/$ma/unicorn-npu/libunicorn.so.1 '"
# An old emulator release's libunicorn.so.1 in the linker cache must not change which library
# either kind of program loads.
mkdir -p "$tmp/emu1"
echo 'int uc_version(unsigned *a, unsigned *b) { *a = 1; *b = 0; return 0; }' >"$tmp/emu1/uc.c"
cc -shared -fPIC -Wl,-soname,libunicorn.so.1 "$tmp/emu1/uc.c" -o "$tmp/emu1/libunicorn.so.1"
echo "$tmp/emu1" >"$ldconf"
ldconfig
echo 'int uc_version(unsigned *, unsigned *); int main(void) { unsigned a, b; uc_version(&a, &b); return a == 1 ? 0 : 1; }' >"$tmp/emu1/old.c"
cc "$tmp/emu1/old.c" -L"$tmp/emu1" -l:libunicorn.so.1 -o "$tmp/emu1/old"
check "with an emulator libunicorn.so.1 in the cache, ours still loads ours" \
  sh -c "ldd '$tmp/test-client' | grep -q 'libunicorn.so.1 => /usr/lib/$ma/unicorn-npu/libunicorn.so.1 '"
check "and a program linked against the old emulator still loads the emulator's" "$tmp/emu1/old"
rm -f "$ldconf"
ldconfig

step "users: $user_in (in group unicorn) and $user_out (not)"
useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \
  --groups unicorn "$user_in"
useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$user_out"

step "the installed unicornd, system mode, on a temporary socket"
sock=$tmp/run/unicornd.sock
/usr/bin/unicornd --system --socket "$sock" --socket-group unicorn --threads 1 \
  >"$tmp/daemon.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
check "the daemon listens" test -S "$sock"
check "the socket is root:unicorn, mode 660" test "$(stat -c '%U:%G %a' "$sock")" = "root:unicorn 660"
check "the member connects from C (test-client)" as "$user_in" "$tmp/test-client" "$sock"
check "the member passes the C API test" sh -c \
  "out=\$(setpriv --reuid=$user_in --regid=$user_in --init-groups '$tmp/api_test' '$sock'); echo \"\$out\"; echo \"\$out\" | grep -q 'c api test ok'"
check "the member runs the CLI (unicorn status)" as "$user_in" UNICORN_SOCKET="$sock" \
  /usr/bin/unicorn status
model=$(ls ~/.cache/unicorn/models/SmolLM2-135M-Instruct.Q4_1.gguf 2>/dev/null || true)
if [ -n "$model" ]; then
  cp "$model" "$tmp/model.gguf"
  chmod 644 "$tmp/model.gguf"
  check "the member generates text with the CLI" sh -c \
    "setpriv --reuid=$user_in --regid=$user_in --init-groups env -i PATH=/usr/bin UNICORN_SOCKET='$sock' /usr/bin/unicorn run -m '$tmp/model.gguf' -n 4 --greedy 'The capital of France is' | grep -q Paris"
else
  say "no default model (scripts/fetch-model): generation not tried"
fi
set +e
out=$(as "$user_out" "$tmp/test-client" "$sock" 2>&1)
rc=$?
set -e
say "the outsider's C program says: $out"
check "the outsider is refused (exit 1)" test "$rc" -eq 1
# The status must be UNICORN_ERR_PERMISSION_DENIED (not "no daemon"), and the message must name
# the group to join.
check "with status 'permission denied' and the group to join" sh -c \
  'echo "$1" | grep -q "^test-client: permission denied: " && echo "$1" | grep -q "group \`unicorn\`"' _ "$out"
set +e
out=$(as "$user_out" UNICORN_SOCKET="$sock" /usr/bin/unicorn --no-spawn status 2>&1)
rc=$?
set -e
say "the outsider's CLI says: $out"
check "the outsider's CLI fails" test "$rc" -ne 0
check "with 'permission denied' and the group to join" sh -c \
  'echo "$1" | grep -qi "permission denied" && echo "$1" | grep -q "group \`unicorn\`"' _ "$out"
# Without --no-spawn too: a refused user must not get a private daemon started behind its back.
set +e
out=$(as "$user_out" UNICORN_SOCKET="$sock" /usr/bin/unicorn status 2>&1)
rc=$?
set -e
check "the outsider's CLI does not start a daemon of its own" test "$rc" -ne 0
check "and says permission denied" sh -c 'echo "$1" | grep -qi "permission denied"' _ "$out"
kill "${pids[-1]}"
wait "${pids[-1]}" || true
unset 'pids[-1]'
check "the daemon removed its socket on exit" test ! -e "$sock"
check "the daemon read /etc/unicorn/unicornd.toml and served in system mode" \
  grep -q "system mode" "$tmp/daemon.log"

step "socket activation: the installed unicornd as user unicornd"
asock=$tmp/activated/unicornd.sock
mkdir -m 755 "$tmp/activated"
systemd-socket-activate --seqpacket -l "$asock" -E RUST_LOG=info \
  setpriv --reuid=unicornd --regid=unicornd --init-groups \
  /usr/bin/unicornd --system --socket "$asock" --threads 1 >"$tmp/activated.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [ -S "$asock" ] && break; sleep 0.1; done
# What the socket unit does (SocketGroup=unicorn, SocketMode=0660).
chgrp unicorn "$asock"
chmod 660 "$asock"
check "the member connects through the activated socket" as "$user_in" "$tmp/test-client" "$asock"
check "the daemon took the socket from systemd" grep -q "using the socket passed by systemd" \
  "$tmp/activated.log"
check "it runs as unicornd" test "$(ps -o user= -p "${pids[-1]}")" = unicornd
check "with group render" awk -v g="$(getent group render | cut -d: -f3)" \
  '/^Groups:/ { for (i = 2; i <= NF; i++) if ($i == g) f = 1 } END { exit !f }' \
  "/proc/${pids[-1]}/status"
check "the outsider is refused there too" not as "$user_out" "$tmp/test-client" "$asock"
kill "${pids[-1]}"
wait "${pids[-1]}" || true
unset 'pids[-1]'
check "the daemon left systemd's socket file alone" test -S "$asock"

# --- removal -------------------------------------------------------------------------------------

step "dpkg -r: the programs go, the policy file and the users stay"
check "the test users are removed" sh -c 'userdel "$1" && userdel "$2"' _ "$user_in" "$user_out"
dpkg -r "${ours[@]}" >"$tmp/dpkg.log" 2>&1 || {
  cat "$tmp/dpkg.log" >&2
  fail "dpkg -r"
}
check "/usr/bin/unicornd is gone" test ! -e /usr/bin/unicornd
check "/usr/lib/$ma/unicorn-npu is gone" test ! -e "/usr/lib/$ma/unicorn-npu"
check "/etc/unicorn/unicornd.toml stays (a conffile)" test -f /etc/unicorn/unicornd.toml
check "user unicornd and group unicorn stay" sh -c 'getent passwd unicornd && getent group unicorn'
check "the emulator is untouched" sh -c "ldconfig -p | grep -q libunicorn.so.2 && test -f /usr/include/unicorn/unicorn.h"

step "dpkg -P: nothing of ours is left"
dpkg -P "${ours[@]}" >"$tmp/dpkg.log" 2>&1 || {
  cat "$tmp/dpkg.log" >&2
  fail "dpkg -P"
}
for p in "${ours[@]}"; do check "$p is purged" not present "$p"; done
after=$(snapshot)
stray=$(comm -13 <(echo "$before") <(echo "$after"))
gone=$(comm -23 <(echo "$before") <(echo "$after"))
check "no stray files (what is on disk is what was there before the install)" \
  sh -c '[ -z "$1" ] && [ -z "$2" ] || { echo "left: $1"; echo "removed: $2"; false; }' _ "$stray" "$gone"

echo "test-install: $passed passed, $failures failed" >&2
[ "$failures" -eq 0 ]
