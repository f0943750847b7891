#!/usr/bin/env bash
# `make package`: unicorn's .deb and .rpm packages, from one release build, into
# $CARGO_TARGET_DIR/packages (target/packages by default).
#
#   .deb: unicorn-npu (daemon, CLI, units, udev rule, sysusers.d, tmpfiles.d, policy file),
#         libunicorn-npu1 (libunicorn.so.1), libunicorn-npu-dev (header, link, unicorn-npu.pc)
#   .rpm: unicorn-npu, unicorn-npu-libs, unicorn-npu-devel (the same split, Fedora's names)
#
# Each tree is staged with `make install` (PREFIX=/usr and the distribution's library
# directory), so the packages and a source install share one layout. The packages are built
# with dpkg-deb and rpmbuild directly, from these files and packaging/debian, packaging/rpm;
# scripts/install-deps installs the tools (dpkg-dev, rpm).
set -euo pipefail
cd "$(dirname "$0")/.."
umask 022

for tool in dpkg-deb dpkg-shlibdeps dpkg-architecture rpmbuild strip; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "build-packages: $tool is missing; scripts/install-deps installs it" >&2
    exit 1
  fi
done

target=$(realpath -m "${CARGO_TARGET_DIR:-target}")
out=$target/packages
work=$target/packaging
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
release=1
maintainer=${UNICORN_PACKAGER:-unicorn developers <unicorn-npu@users.noreply.github.com>}

echo "build-packages: cargo build --release" >&2
make --no-print-directory build
rm -rf "$work" "$out"
mkdir -p "$work" "$out"

# stage ROOT LIBDIR: `make install` into ROOT, binaries and library stripped.
stage() {
  local root=$1 libdir=$2
  make --no-print-directory install DESTDIR="$root" PREFIX=/usr LIBDIR="$libdir" \
    SYSCONFDIR=/etc >"$work/install.log"
  strip --strip-unneeded "$root/usr/bin/unicornd" "$root/usr/bin/unicorn" \
    "$root$libdir"/unicorn-npu/libunicorn.so.*.*.*
}

# take ROOT DEST PATH...: moves PATHs (relative to ROOT) into the package tree DEST.
take() {
  local root=$1 dest=$2
  shift 2
  local p
  for p in "$@"; do
    if [ ! -e "$root/$p" ] && [ ! -L "$root/$p" ]; then
      echo "build-packages: $p was not staged" >&2
      exit 1
    fi
    mkdir -p "$dest/$(dirname "$p")"
    mv "$root/$p" "$dest/$p"
  done
}

# all_taken ROOT: every staged file went into a package.
all_taken() {
  local left
  left=$(find "$1" ! -type d)
  if [ -n "$left" ]; then
    echo "build-packages: staged but in no package:" >&2
    echo "$left" >&2
    exit 1
  fi
}

# ---------------------------------------------------------------------------------------------
# Debian

arch=$(dpkg --print-architecture)
multiarch=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null)
debversion=$version-$release
libdir=/usr/lib/$multiarch
root=$work/deb-root
stage "$root" "$libdir"
libfile=$(basename "$(ls "$root$libdir"/unicorn-npu/libunicorn.so.*.*.*)")

main=$work/deb/unicorn-npu
lib=$work/deb/libunicorn-npu1
dev=$work/deb/libunicorn-npu-dev
take "$root" "$main" usr/bin/unicornd usr/bin/unicorn etc/unicorn usr/lib/systemd usr/lib/udev \
  usr/lib/sysusers.d usr/lib/tmpfiles.d usr/share/doc/unicorn-npu
take "$root" "$lib" "${libdir#/}/unicorn-npu/libunicorn.so.1" "${libdir#/}/unicorn-npu/$libfile"
# Debian ships shared libraries without the execute bit (the RPM keeps it: rpm reads the
# dependencies of executable ELF files only).
chmod 644 "$lib/${libdir#/}/unicorn-npu/$libfile"
take "$root" "$dev" "${libdir#/}/unicorn-npu/libunicorn.so" usr/include/unicorn-npu \
  "${libdir#/}/pkgconfig/unicorn-npu.pc"
all_taken "$root"

# shlibdeps FILE...: the Depends that the ELF files need (dpkg-shlibdeps wants a debian/control).
shlibdeps() {
  local dir=$work/shlibdeps
  mkdir -p "$dir/debian"
  printf 'Source: unicorn\n\nPackage: unicorn\nArchitecture: any\n' >"$dir/debian/control"
  local deps
  deps=$(cd "$dir" && dpkg-shlibdeps -O "$@" 2>"$work/shlibdeps.log" | sed -n 's/^shlibs:Depends=//p')
  if [ -z "$deps" ]; then
    echo "build-packages: dpkg-shlibdeps found no dependencies for $*:" >&2
    cat "$work/shlibdeps.log" >&2
    exit 1
  fi
  echo "$deps"
}

# The Debian changelog every package carries (Debian policy 12.7), dated by the last commit.
date=$(git log -1 --format=%cD 2>/dev/null || date -R)
printf '%s\n' "unicorn-npu ($debversion) unstable; urgency=medium" "" \
  "  * unicorn $version, packaged by packaging/build-packages.sh." "" \
  " -- $maintainer  $date" >"$work/changelog.Debian"
gzip -9n <"$work/changelog.Debian" >"$work/changelog.Debian.gz"

build_deb() {
  local pkg=$1 dir=$2 shlibs=$3
  local src=packaging/debian/$pkg
  install -d -m755 "$dir/DEBIAN" "$dir/usr/share/doc/$pkg"
  install -m644 packaging/copyright "$dir/usr/share/doc/$pkg/copyright"
  install -m644 "$work/changelog.Debian.gz" "$dir/usr/share/doc/$pkg/changelog.Debian.gz"
  sed -e "s|@VERSION@|$debversion|" -e "s|@UPSTREAM_VERSION@|$version|" -e "s|@ARCH@|$arch|" \
    -e "s|@MAINTAINER@|$maintainer|" -e "s|@MULTIARCH@|$multiarch|" \
    -e "s|@SHLIBS@|$shlibs|" -e "s|@INSTALLED_SIZE@|$(du -sk --exclude=DEBIAN "$dir" | cut -f1)|" \
    "$src/control.in" >"$dir/DEBIAN/control"
  local f
  for f in postinst prerm postrm; do
    if [ -f "$src/$f" ]; then install -m755 "$src/$f" "$dir/DEBIAN/$f"; fi
  done
  if [ -f "$src/conffiles" ]; then install -m644 "$src/conffiles" "$dir/DEBIAN/conffiles"; fi
  if [ -f "$src/shlibs.in" ]; then
    sed -e "s|@UPSTREAM_VERSION@|$version|" "$src/shlibs.in" >"$dir/DEBIAN/shlibs"
    chmod 644 "$dir/DEBIAN/shlibs"
  fi
  # md5sums of every file but the conffiles, as dh_md5sums writes them.
  (cd "$dir" && find . -type f ! -path './DEBIAN/*' ! -path ./etc/unicorn/unicornd.toml \
    -printf '%P\0' | LC_ALL=C sort -z | xargs -0 -r md5sum) >"$dir/DEBIAN/md5sums"
  chmod 644 "$dir/DEBIAN/md5sums"
  dpkg-deb --root-owner-group -Zxz --build "$dir" "$out/${pkg}_${debversion}_${arch}.deb" >/dev/null
  echo "build-packages: $out/${pkg}_${debversion}_${arch}.deb" >&2
}

main_deps=$(shlibdeps "$main/usr/bin/unicornd" "$main/usr/bin/unicorn")
lib_deps=$(shlibdeps "$lib/${libdir#/}/unicorn-npu/$libfile")
build_deb unicorn-npu "$main" "$main_deps"
build_deb libunicorn-npu1 "$lib" "$lib_deps"
build_deb libunicorn-npu-dev "$dev" ""

# ---------------------------------------------------------------------------------------------
# RPM

rpmlibdir=$(rpm --eval '%{_libdir}')
rpmroot=$work/rpm-root
stage "$rpmroot" "$rpmlibdir"
install -Dm644 packaging/copyright "$rpmroot/usr/share/licenses/unicorn-npu/copyright"
sed -e "s|@VERSION@|$version|" -e "s|@RELEASE@|$release|" -e "s|@MAINTAINER@|$maintainer|" \
  -e "s|@LIBVERSION@|${libfile#libunicorn.so.}|" \
  packaging/rpm/unicorn-npu.spec.in >"$work/unicorn-npu.spec"
rpmbuild -bb --quiet \
  --define "_topdir $work/rpmbuild" \
  --define "_rpmdir $out" \
  --define "_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm" \
  --define "stage $rpmroot" \
  --define "_buildhost unicorn-build" \
  "$work/unicorn-npu.spec" >"$work/rpmbuild.log" 2>&1 || {
  cat "$work/rpmbuild.log" >&2
  exit 1
}
for f in "$out"/*.rpm; do echo "build-packages: $f" >&2; done
