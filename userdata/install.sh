#!/bin/bash
# imgbuild install: docker, docker compose {{ compose_version }}, {{ storage_package }}, the
# CloudWatch agent and the Chroma image {{ image }}. Full-mode user-data and the bake run it.
set -euo pipefail

log() { echo "imgbuild-install: $*" >&2; }
die() { log "error: $*"; exit 1; }

# dnf can collide with the SSM agent's own update on the RPM lock: retry with back-off.
dnf_install() {
  local attempt
  for attempt in 1 2 3 4 5 6 7 8; do
    if dnf install -y --setopt=install_weak_deps=False "$@"; then
      return 0
    fi
    log "dnf install $* failed (attempt ${attempt} of 8), retrying in $((attempt * 5))s"
    sleep $((attempt * 5))
  done
  die "dnf install $* kept failing"
}

dnf_install docker {{ storage_package }} amazon-cloudwatch-agent
systemctl enable --now docker.service

{# docker compose has no package on Amazon Linux 2023: a pinned release, checked against its
   published sha256 before it is installed. -#}
readonly compose_version="{{ compose_version }}"
case "$(uname -m)" in
  x86_64) compose_arch=x86_64; compose_sha256="{{ compose_sha256_x86_64 }}" ;;
  aarch64) compose_arch=aarch64; compose_sha256="{{ compose_sha256_aarch64 }}" ;;
  *) die "no docker compose build for architecture $(uname -m)" ;;
esac
readonly plugin=/usr/local/lib/docker/cli-plugins/docker-compose
if ! { [[ -x "${plugin}" ]] && echo "${compose_sha256}  ${plugin}" | sha256sum --check --status; }; then
  download=$(mktemp)
  trap 'rm -f "${download}"' EXIT
  curl -fsSL --retry 5 --retry-delay 3 --retry-connrefused -o "${download}" \
    "https://github.com/docker/compose/releases/download/v${compose_version}/docker-compose-linux-${compose_arch}"
  echo "${compose_sha256}  ${download}" | sha256sum --check --status \
    || die "the docker compose ${compose_version} download does not match its pinned sha256 ${compose_sha256}"
  install -D -m 0755 "${download}" "${plugin}"
fi
docker compose version

# Pull the pinned image now, so that starting Chroma waits on nothing.
readonly image="{{ image }}"
attempt=1
until docker pull --quiet "${image}"; do
  [[ ${attempt} -lt 5 ]] || die "could not pull ${image}"
  log "docker pull ${image} failed (attempt ${attempt} of 5), retrying in $((attempt * 10))s"
  sleep $((attempt * 10))
  attempt=$((attempt + 1))
done
{# Written last: the boot refuses to start Chroma without it, because cloud-init runs a MIME boot
   part even after this part failed. -#}
install -d -m 0755 "${IMGBUILD_ROOT:-}{{ marker_dir }}"
echo "${image}" > "${IMGBUILD_ROOT:-}{{ install_marker }}"
log "installed docker, docker compose ${compose_version} and ${image}"
