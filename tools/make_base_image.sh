#!/usr/bin/env bash
# Makes the local base image for the Dockerfile from Debian packages alone, for a machine that
# reaches a Debian mirror but no container registry: debootstrap a minimal Debian bookworm root
# file system (what debian:bookworm-slim holds; its python3 is 3.11), trim it, and import it.
#
#   tools/make_base_image.sh        # -> localhost/xlaserve-base:bookworm (about 2-4 minutes)
#   podman build --build-arg BASE_IMAGE=localhost/xlaserve-base:bookworm -t xlaserve .
#
# Environment (all optional):
#   IMAGE     image name              (default localhost/xlaserve-base:bookworm)
#   ENGINE    podman, docker or buildah: what imports the tarball (default: the first found)
#   MIRROR    Debian mirror           (default http://deb.debian.org/debian)
#   SUITE     Debian release          (default bookworm)
#   EXTRA_CA  PEM files the image trusts beside Debian's CAs (default: this host's
#             /usr/local/share/ca-certificates/*.crt), so `pip install` inside image builds works
#             behind a TLS-inspecting proxy; EXTRA_CA= (empty) adds none. The image is for local
#             builds: do not push a base that trusts a site-local CA.
# Needs root (debootstrap, chroot) and the Debian package debootstrap.
set -euo pipefail

IMAGE=${IMAGE:-localhost/xlaserve-base:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=${SUITE:-bookworm}
if [ -z "${EXTRA_CA+set}" ]; then
  EXTRA_CA=$(ls /usr/local/share/ca-certificates/*.crt 2>/dev/null | tr '\n' ' ' || true)
fi
if [ -z "${ENGINE:-}" ]; then
  for e in podman docker buildah; do
    if command -v "$e" >/dev/null 2>&1; then ENGINE=$e; break; fi
  done
fi
say() { echo "[make_base_image $(date +%H:%M:%S)] $*"; }
die() { echo "make_base_image: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (debootstrap and chroot need it)"
command -v debootstrap >/dev/null || die "debootstrap is missing: apt-get install debootstrap"
[ -n "${ENGINE:-}" ] || die "no podman, docker or buildah found: apt-get install podman"

root=$(mktemp -d /var/tmp/xlaserve-base.XXXXXX)
trap 'rm -rf "$root"' EXIT

say "debootstrap --variant=minbase $SUITE from $MIRROR into $root"
debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 \
  || { tail -30 "$root.log" >&2; rm -f "$root.log"; die "debootstrap failed"; }
rm -f "$root.log"

# The same package sources as a Debian image: the release, its updates and security fixes.
security=${MIRROR%/debian}/debian-security
cat >"$root/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $security $SUITE-security main
EOF
# Like the official slim images: no recommends, no docs or man pages from later installs.
cat >"$root/etc/apt/apt.conf.d/90xlaserve-slim" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
EOF
cat >"$root/etc/dpkg/dpkg.cfg.d/90xlaserve-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF

for ca in $EXTRA_CA; do
  say "trusting $ca"
  cp "$ca" "$root/usr/local/share/ca-certificates/$(basename "${ca%.*}").crt"
done
chroot "$root" update-ca-certificates >/dev/null 2>&1  # (openssl rehash warns about the bundle)

chroot "$root" apt-get clean
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/log/*.log \
  "$root"/var/cache/debconf/*-old "$root"/usr/share/man/* "$root"/usr/share/info/* \
  "$root"/usr/share/locale/*
find "$root/usr/share/doc" -mindepth 2 ! -name copyright -delete 2>/dev/null || true
: >"$root/etc/hostname"
: >"$root/etc/resolv.conf"

path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
say "importing $(du -sh "$root" | cut -f1) as $IMAGE with $ENGINE"
case "$ENGINE" in
  podman|docker)
    tar --numeric-owner -C "$root" -cf - . | "$ENGINE" import \
      --change "ENV PATH=$path" --change 'CMD ["/bin/bash"]' - "$IMAGE" >/dev/null ;;
  buildah)
    tar --numeric-owner -C "$root" -cf "$root.tar" .
    ctr=$(buildah from scratch)
    buildah add "$ctr" "$root.tar" / >/dev/null
    buildah config --env "PATH=$path" --cmd '["/bin/bash"]' "$ctr"
    buildah commit --rm "$ctr" "$IMAGE" >/dev/null
    rm -f "$root.tar" ;;
  *) die "ENGINE must be podman, docker or buildah, got $ENGINE" ;;
esac
say "done: $IMAGE"
"$ENGINE" images "$IMAGE" 2>/dev/null || true
