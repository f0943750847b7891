#!/usr/bin/env bash
# Checks what `make package` built, without installing anything (no root needed): each
# package's exact file list with modes, owners and links; the library's SONAME, file name and
# exported symbols; the pkg-config module's output, and a C program linked through it; the
# systemd units (systemd-analyze verify, and the hardening they must keep); the udev rule; the
# maintainer scripts' syntax; the RPM's dependencies (it must not claim libunicorn.so.1).

# `COND && ok ... || fail ...` is safe here: ok never fails.
# shellcheck disable=SC2015
set -euo pipefail
cd "$(dirname "$0")/.."

pkgs=$(realpath -m "${CARGO_TARGET_DIR:-target}")/packages
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
abi_major=$(sed -n 's/^#define UNICORN_ABI_MAJOR \([0-9]*\)$/\1/p' include/unicorn.h)
abi_minor=$(sed -n 's/^#define UNICORN_ABI_MINOR \([0-9]*\)$/\1/p' include/unicorn.h)
libv=$abi_major.$abi_minor.${version##*.}
arch=$(dpkg --print-architecture)
ma=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null)
rpmlib=$(rpm --eval '%{_libdir}')
rpmarch=$(rpm --eval '%{_arch}')
debv=$version-1

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
failures=0
passed=0
ok() {
  passed=$((passed + 1))
  echo "check-packages: ok: $*" >&2
}
fail() {
  failures=$((failures + 1))
  echo "check-packages: FAILED: $*" >&2
}

deb() { echo "$pkgs/${1}_${debv}_${arch}.deb"; }
rpmf() { echo "$pkgs/$1-$version-1.$rpmarch.rpm"; }
for f in "$(deb unicorn-npu)" "$(deb libunicorn-npu1)" "$(deb libunicorn-npu-dev)" \
  "$(rpmf unicorn-npu)" "$(rpmf unicorn-npu-libs)" "$(rpmf unicorn-npu-devel)"; do
  if [ ! -f "$f" ]; then
    echo "check-packages: $f is missing: run make package first" >&2
    exit 1
  fi
done

# same WHAT EXPECTED ACTUAL: compares two listings.
same() {
  if diff -u <(echo "$2") <(echo "$3") >"$tmp/diff"; then
    ok "$1"
  else
    fail "$1 differs (- expected, + actual):"
    cat "$tmp/diff" >&2
  fi
}

# --- file lists: mode, owner, path (-> link target) -------------------------------------------

deb_list() { dpkg-deb -c "$1" | awk '{ $3 = $4 = $5 = ""; print }' | tr -s ' ' | sort; }
rpm_list() {
  rpm -qp --qf '[%{FILEMODES:perms} %{FILEUSERNAME}/%{FILEGROUPNAME} %{FILENAMES} %{FILELINKTOS}\n]' \
    "$1" 2>/dev/null | sed -e 's/ $//' -e 's/^\(l[^ ]* [^ ]* [^ ]*\) \(.*\)/\1 -> \2/' | sort
}
dirs() {
  local p
  for p in "$@"; do
    if [ "$p" = . ]; then echo "drwxr-xr-x root/root ./"; else echo "drwxr-xr-x root/root ./$p/"; fi
  done
}

same "deb unicorn-npu files" "$( (
  dirs . etc etc/unicorn usr usr/bin usr/lib usr/lib/systemd usr/lib/systemd/system \
    usr/lib/systemd/system-preset usr/lib/sysusers.d usr/lib/tmpfiles.d usr/lib/udev \
    usr/lib/udev/rules.d usr/share usr/share/doc usr/share/doc/unicorn-npu
  cat <<EOF
-rw-r--r-- root/root ./etc/unicorn/unicornd.toml
-rwxr-xr-x root/root ./usr/bin/unicorn
-rwxr-xr-x root/root ./usr/bin/unicornd
-rw-r--r-- root/root ./usr/lib/systemd/system/unicornd.service
-rw-r--r-- root/root ./usr/lib/systemd/system/unicornd.socket
-rw-r--r-- root/root ./usr/lib/systemd/system-preset/80-unicorn-npu.preset
-rw-r--r-- root/root ./usr/lib/sysusers.d/unicorn-npu.conf
-rw-r--r-- root/root ./usr/lib/tmpfiles.d/unicorn-npu.conf
-rw-r--r-- root/root ./usr/lib/udev/rules.d/60-unicorn-npu.rules
-rw-r--r-- root/root ./usr/share/doc/unicorn-npu/README.md
-rw-r--r-- root/root ./usr/share/doc/unicorn-npu/README.udev.md
-rw-r--r-- root/root ./usr/share/doc/unicorn-npu/copyright
-rw-r--r-- root/root ./usr/share/doc/unicorn-npu/changelog.Debian.gz
EOF
) | sort)" "$(deb_list "$(deb unicorn-npu)")"

same "deb libunicorn-npu1 files" "$( (
  dirs . usr usr/lib "usr/lib/$ma" "usr/lib/$ma/unicorn-npu" usr/share usr/share/doc \
    usr/share/doc/libunicorn-npu1
  cat <<EOF
-rw-r--r-- root/root ./usr/lib/$ma/unicorn-npu/libunicorn.so.$libv
lrwxrwxrwx root/root ./usr/lib/$ma/unicorn-npu/libunicorn.so.$abi_major -> libunicorn.so.$libv
-rw-r--r-- root/root ./usr/share/doc/libunicorn-npu1/copyright
-rw-r--r-- root/root ./usr/share/doc/libunicorn-npu1/changelog.Debian.gz
EOF
) | sort)" "$(deb_list "$(deb libunicorn-npu1)")"

same "deb libunicorn-npu-dev files" "$( (
  dirs . usr usr/include usr/include/unicorn-npu usr/lib "usr/lib/$ma" "usr/lib/$ma/pkgconfig" \
    "usr/lib/$ma/unicorn-npu" usr/share usr/share/doc usr/share/doc/libunicorn-npu-dev
  cat <<EOF
-rw-r--r-- root/root ./usr/include/unicorn-npu/unicorn.h
-rw-r--r-- root/root ./usr/lib/$ma/pkgconfig/unicorn-npu.pc
lrwxrwxrwx root/root ./usr/lib/$ma/unicorn-npu/libunicorn.so -> libunicorn.so.$abi_major
-rw-r--r-- root/root ./usr/share/doc/libunicorn-npu-dev/copyright
-rw-r--r-- root/root ./usr/share/doc/libunicorn-npu-dev/changelog.Debian.gz
EOF
) | sort)" "$(deb_list "$(deb libunicorn-npu-dev)")"

same "rpm unicorn-npu files" "$(sort <<EOF
drwxr-xr-x root/root /etc/unicorn
-rw-r--r-- root/root /etc/unicorn/unicornd.toml
-rwxr-xr-x root/root /usr/bin/unicorn
-rwxr-xr-x root/root /usr/bin/unicornd
-rw-r--r-- root/root /usr/lib/systemd/system/unicornd.service
-rw-r--r-- root/root /usr/lib/systemd/system/unicornd.socket
-rw-r--r-- root/root /usr/lib/systemd/system-preset/80-unicorn-npu.preset
-rw-r--r-- root/root /usr/lib/sysusers.d/unicorn-npu.conf
-rw-r--r-- root/root /usr/lib/tmpfiles.d/unicorn-npu.conf
-rw-r--r-- root/root /usr/lib/udev/rules.d/60-unicorn-npu.rules
drwxr-xr-x root/root /usr/share/doc/unicorn-npu
-rw-r--r-- root/root /usr/share/doc/unicorn-npu/README.md
-rw-r--r-- root/root /usr/share/doc/unicorn-npu/README.udev.md
-rw-r--r-- root/root /usr/share/licenses/unicorn-npu/copyright
EOF
)" "$(rpm_list "$(rpmf unicorn-npu)")"

same "rpm unicorn-npu-libs files" "$(sort <<EOF
drwxr-xr-x root/root $rpmlib/unicorn-npu
lrwxrwxrwx root/root $rpmlib/unicorn-npu/libunicorn.so.$abi_major -> libunicorn.so.$libv
-rwxr-xr-x root/root $rpmlib/unicorn-npu/libunicorn.so.$libv
-rw-r--r-- root/root /usr/share/licenses/unicorn-npu/copyright
EOF
)" "$(rpm_list "$(rpmf unicorn-npu-libs)")"

same "rpm unicorn-npu-devel files" "$(sort <<EOF
drwxr-xr-x root/root /usr/include/unicorn-npu
-rw-r--r-- root/root /usr/include/unicorn-npu/unicorn.h
-rw-r--r-- root/root $rpmlib/pkgconfig/unicorn-npu.pc
lrwxrwxrwx root/root $rpmlib/unicorn-npu/libunicorn.so -> libunicorn.so.$abi_major
EOF
)" "$(rpm_list "$(rpmf unicorn-npu-devel)")"

# --- control data and dependencies --------------------------------------------------------------

field() { dpkg-deb -f "$1" "$2"; }
[ "$(field "$(deb unicorn-npu)" Conflicts)" = unicorn ] &&
  ok "unicorn-npu conflicts with the Ruby server unicorn (/usr/bin/unicorn)" ||
  fail "unicorn-npu must conflict with unicorn"
[ "$(field "$(deb libunicorn-npu-dev)" Depends)" = "libunicorn-npu1 (= $debv)" ] &&
  ok "libunicorn-npu-dev depends on libunicorn-npu1 (= $debv)" ||
  fail "libunicorn-npu-dev Depends: $(field "$(deb libunicorn-npu-dev)" Depends)"
for p in unicorn-npu libunicorn-npu1; do
  case "$(field "$(deb $p)" Depends)" in
  *"libc6 (>= "*) ok "$p depends on libc6 (dpkg-shlibdeps)" ;;
  *) fail "$p has no libc6 dependency" ;;
  esac
done
dpkg-deb --ctrl-tarfile "$(deb unicorn-npu)" | tar -x -C "$tmp" ./conffiles ./postinst ./prerm ./postrm
[ "$(cat "$tmp/conffiles")" = /etc/unicorn/unicornd.toml ] &&
  ok "the policy file is a conffile" || fail "conffiles: $(cat "$tmp/conffiles")"
for s in postinst prerm postrm; do
  if sh -n "$tmp/$s" && { ! command -v dash >/dev/null || dash -n "$tmp/$s"; }; then
    ok "deb $s parses (sh)"
  else
    fail "deb $s does not parse"
  fi
done
dpkg-deb --ctrl-tarfile "$(deb libunicorn-npu1)" | tar -x -O ./shlibs >"$tmp/shlibs"
[ "$(cat "$tmp/shlibs")" = "libunicorn $abi_major libunicorn-npu1 (>= $version)" ] &&
  ok "libunicorn-npu1 shlibs" || fail "shlibs: $(cat "$tmp/shlibs")"

if rpm -qp --provides "$(rpmf unicorn-npu-libs)" 2>/dev/null | grep -q 'libunicorn\.so'; then
  fail "unicorn-npu-libs provides libunicorn.so.* (it must not claim the emulator's SONAME)"
else
  ok "unicorn-npu-libs does not provide libunicorn.so.$abi_major()"
fi
rpm -qp --provides "$(rpmf unicorn-npu-devel)" 2>/dev/null | grep -qx "pkgconfig(unicorn-npu) = $version" &&
  ok "unicorn-npu-devel provides pkgconfig(unicorn-npu)" || fail "no pkgconfig(unicorn-npu) provide"
rpm -qp --requires "$(rpmf unicorn-npu-devel)" 2>/dev/null | grep -q "^unicorn-npu-libs(.*) = $version-1$" &&
  ok "unicorn-npu-devel requires unicorn-npu-libs" || fail "unicorn-npu-devel does not require -libs"
[ "$(rpm -qp --conflicts "$(rpmf unicorn-npu)" 2>/dev/null)" = rubygem-unicorn ] &&
  ok "unicorn-npu (rpm) conflicts with rubygem-unicorn" || fail "rpm conflicts"
rpm -qp --scripts "$(rpmf unicorn-npu)" 2>/dev/null |
  awk '/^[a-z]+ scriptlet \(using \/bin\/sh\):$/ { n++; f = sprintf("'"$tmp"'/rpm-scriptlet-%d", n); next } { print > f }'
for s in "$tmp"/rpm-scriptlet-*; do
  sh -n "$s" && ok "rpm scriptlet $(basename "$s") parses" || fail "rpm scriptlet $s does not parse"
done
[ "$(find "$tmp" -name 'rpm-scriptlet-*' | wc -l)" = 3 ] && ok "rpm has %post, %preun, %postun" ||
  fail "rpm scriptlets: $(ls "$tmp"/rpm-scriptlet-*)"

# The three RPMs install together (files only: no scriptlets, no dependencies) into an empty root.
mkdir -p "$tmp/rpmroot"
if rpm --root "$tmp/rpmroot" --initdb 2>"$tmp/rpm.log" &&
  rpm --root "$tmp/rpmroot" -i --nodeps --noscripts "$(rpmf unicorn-npu)" \
    "$(rpmf unicorn-npu-libs)" "$(rpmf unicorn-npu-devel)" 2>>"$tmp/rpm.log" &&
  [ -x "$tmp/rpmroot/usr/bin/unicornd" ] &&
  [ -L "$tmp/rpmroot$rpmlib/unicorn-npu/libunicorn.so" ]; then
  ok "the RPMs install together (rpm -i --root)"
else
  fail "rpm -i --root: $(grep -v 'use Alien\|know what you are doing' "$tmp/rpm.log")"
fi

# --- the library ---------------------------------------------------------------------------------

deb_root=$tmp/deb
rpm_root=$tmp/rpm
mkdir -p "$deb_root" "$rpm_root"
for p in unicorn-npu libunicorn-npu1 libunicorn-npu-dev; do dpkg-deb -x "$(deb $p)" "$deb_root"; done
for p in unicorn-npu unicorn-npu-libs unicorn-npu-devel; do
  rpm2archive -n - <"$(rpmf $p)" | tar -x -C "$rpm_root"
done
for lib in "$deb_root/usr/lib/$ma/unicorn-npu/libunicorn.so.$libv" \
  "$rpm_root$rpmlib/unicorn-npu/libunicorn.so.$libv"; do
  where=${lib#"$tmp"/}
  readelf -d "$lib" | grep -q "Library soname: \[libunicorn.so.$abi_major\]" &&
    ok "$where: SONAME libunicorn.so.$abi_major" || fail "$where: SONAME is not libunicorn.so.$abi_major"
  # Every defined dynamic symbol, functions and data alike.
  foreign=$(nm -D --defined-only "$lib" | awk '{ print $3 }' | grep -v '^unicorn_' || true)
  count=$(nm -D --defined-only "$lib" | grep -c ' unicorn_' || true)
  if [ -z "$foreign" ] && [ "$count" -gt 0 ]; then
    ok "$where: exports only unicorn_* ($count symbols)"
  else
    fail "$where: exports beyond unicorn_*: $foreign"
  fi
  if readelf -d "$lib" | grep -qE 'RPATH|RUNPATH'; then fail "$where has an RPATH"; else ok "$where: no RPATH"; fi
done

# --- pkg-config, and a C program built through it ----------------------------------------------

pc=$deb_root/usr/lib/$ma/pkgconfig
got=$(PKG_CONFIG_PATH=$pc pkg-config --cflags --libs unicorn-npu | sed 's/ *$//')
want="-I/usr/include/unicorn-npu -L/usr/lib/$ma/unicorn-npu -Wl,-rpath,/usr/lib/$ma/unicorn-npu -lunicorn"
[ "$got" = "$want" ] && ok "pkg-config --cflags --libs unicorn-npu: $want" ||
  fail "pkg-config --cflags --libs unicorn-npu: got '$got', want '$want'"
[ "$(PKG_CONFIG_PATH=$pc pkg-config --modversion unicorn-npu)" = "$version" ] &&
  ok "pkg-config --modversion unicorn-npu: $version" || fail "pkg-config --modversion"
got=$(PKG_CONFIG_PATH=$rpm_root$rpmlib/pkgconfig pkg-config --libs unicorn-npu | sed 's/ *$//')
want="-L$rpmlib/unicorn-npu -Wl,-rpath,$rpmlib/unicorn-npu -lunicorn"
[ "$got" = "$want" ] && ok "rpm: pkg-config --libs unicorn-npu: $want" ||
  fail "rpm: pkg-config --libs unicorn-npu: got '$got', want '$want'"
# The C program, compiled and linked against the extracted tree (the sysroot).
flags=$(PKG_CONFIG_SYSROOT_DIR=$deb_root PKG_CONFIG_PATH=$pc pkg-config --cflags --libs unicorn-npu)
# shellcheck disable=SC2086
if ${CC:-cc} -std=c11 -Wall -Wextra -Werror -pedantic packaging/test-client.c $flags \
  -o "$tmp/test-client" 2>"$tmp/cc.log"; then
  ok "a C program builds with pkg-config --cflags --libs unicorn-npu"
  readelf -d "$tmp/test-client" | grep -q 'NEEDED.*\[libunicorn.so.1\]' &&
    ok "it needs libunicorn.so.1" || fail "the C program does not need libunicorn.so.1"
else
  fail "the C program does not build: $(cat "$tmp/cc.log")"
fi

# --- units, udev rule, sysusers -----------------------------------------------------------------

units=$tmp/units
mkdir -p "$units"
cp "$deb_root"/usr/lib/systemd/system/unicornd.* "$units/"
# verify checks that ExecStart's program exists: point it at the extracted one.
sed -i "s|^ExecStart=/usr/bin/unicornd|ExecStart=$deb_root/usr/bin/unicornd|" "$units/unicornd.service"
if out=$(systemd-analyze verify "$units/unicornd.socket" "$units/unicornd.service" 2>&1) &&
  [ -z "$out" ]; then
  ok "systemd-analyze verify unicornd.socket unicornd.service"
else
  fail "systemd-analyze verify: $out"
fi
service=$deb_root/usr/lib/systemd/system/unicornd.service
for line in "ExecStart=/usr/bin/unicornd --system" "User=unicornd" "DevicePolicy=closed" \
  "DeviceAllow=char-accel rw" "DeviceAllow=char-drm rw" "LimitMEMLOCK=infinity" \
  "ProtectSystem=strict" "ProtectHome=yes" "NoNewPrivileges=yes" \
  "RestrictAddressFamilies=AF_UNIX" "CapabilityBoundingSet=" "Requires=unicornd.socket"; do
  grep -qx "$line" "$service" && ok "unicornd.service: $line" || fail "unicornd.service lacks $line"
done
socket=$deb_root/usr/lib/systemd/system/unicornd.socket
for line in "ListenSequentialPacket=/run/unicorn/unicornd.sock" "SocketGroup=unicorn" \
  "SocketMode=0660" "WantedBy=sockets.target"; do
  grep -qx "$line" "$socket" && ok "unicornd.socket: $line" || fail "unicornd.socket lacks $line"
done
rpm_service=$rpm_root/usr/lib/systemd/system/unicornd.service
cmp -s "$service" "$rpm_service" && ok "the .deb and the .rpm ship the same unit" ||
  fail "the units of the .deb and the .rpm differ"
if command -v systemd-analyze >/dev/null && systemd-analyze security --help 2>/dev/null | grep -q -- --offline; then
  exposure=$(systemd-analyze security --offline=true "$units/unicornd.service" 2>/dev/null |
    sed -n 's/.*Overall exposure level for unicornd.service: \([0-9.]*\).*/\1/p')
  awk "BEGIN { exit !($exposure <= 2.0) }" && ok "systemd-analyze security: exposure $exposure" ||
    fail "systemd-analyze security: exposure $exposure (over 2.0)"
fi
rule=$deb_root/usr/lib/udev/rules.d/60-unicorn-npu.rules
for want in 'SUBSYSTEM=="accel".*DRIVERS=="amdxdna".*GROUP="render", MODE="0660"' \
  'SUBSYSTEM=="drm", KERNEL=="renderD\[0-9\]\*".*GROUP="render", MODE="0660"'; do
  grep -q "$want" "$rule" && ok "udev rule: $want" || fail "udev rule lacks $want"
done
grep -E 'MODE="0?6[0-7][1-7]"' "$rule" && fail "udev rule gives world access" ||
  ok "udev rule gives no world access"
sysusers=$deb_root/usr/lib/sysusers.d/unicorn-npu.conf
[ "$(grep -v '^#' "$sysusers" | tr -s ' ')" = "$(printf '%s\n' 'g unicorn -' \
  'u unicornd - "unicorn LLM inference daemon" /nonexistent' 'm unicornd render')" ] &&
  ok "sysusers.d: group unicorn, user unicornd in render" || fail "sysusers.d: $(cat "$sysusers")"

echo "check-packages: $passed passed, $failures failed" >&2
[ "$failures" -eq 0 ]
