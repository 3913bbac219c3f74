#!/bin/bash
# imgbuild quiesce: run on the Chroma instance through SSM Run Command before an AWS Backup job.
# AWS Backup copies an EFS file system over minutes while it changes, so the job alone does not
# give a consistent SQLite database. This stops chroma.service (compose lets go of the writer
# lock), takes the writer lock itself so no other instance can start writing, copies the data
# directory and the version marker to a sibling directory on the same file system, and starts
# Chroma again at once: Chroma is down only while the copy runs. The backup job then carries the
# consistent copy. The last line of output is the result imgbuild reads.
set -euo pipefail

root="${IMGBUILD_ROOT:-}"
readonly mount_point="${root}${IMGBUILD_MOUNT_POINT:?}"
readonly data_dir="${mount_point}/${IMGBUILD_DATA_SUBDIR:?}"
readonly lock_file="${mount_point}/${IMGBUILD_LOCK_NAME:?}"
readonly version_file="${mount_point}/${IMGBUILD_VERSION_NAME:?}"
readonly copy_dir="${mount_point}/${IMGBUILD_COPY_NAME:?}"
readonly token="${IMGBUILD_TOKEN:?}"
readonly lock_wait="${IMGBUILD_LOCK_WAIT_SECS:-120}"

log() { echo "imgbuild-quiesce: $*" >&2; }
fail() {
  log "$*"
  echo "IMGBUILD_RESULT status=failed token=${token}"
  exit 1
}
now_ms() { echo $(($(date +%s%N) / 1000000)); }

mountpoint -q "${mount_point}" || fail "EFS is not mounted on ${mount_point}: nothing to copy"
[[ -d "${data_dir}" ]] || fail "${data_dir} does not exist: Chroma never stored data on this file system"

was_active=0
if systemctl is-active --quiet chroma.service; then was_active=1; fi
stopped_ms=$(now_ms)
restarted=0
# Whatever happens from here on, Chroma is started again if it was running.
restart() {
  if [[ ${restarted} -eq 0 && ${was_active} -eq 1 ]]; then
    restarted=1
    systemctl start chroma.service || log "starting chroma.service again failed: systemd's Restart= retries it"
  fi
}
trap restart EXIT

[[ ${was_active} -eq 1 ]] && systemctl stop chroma.service
exec 9>>"${lock_file}"
flock -w "${lock_wait}" 9 || fail "another instance holds the writer lock ${lock_file} after ${lock_wait}s; no copy made"

rm -rf "${copy_dir}.tmp"
install -d -m 0700 "${copy_dir}.tmp"
cp -a "${data_dir}" "${copy_dir}.tmp/data"
version=""
if [[ -s "${version_file}" ]]; then
  version=$(head -n 1 "${version_file}")
  cp -a "${version_file}" "${copy_dir}.tmp/"
fi
printf 'token=%s\nversion=%s\ntaken=%s\n' "${token}" "${version}" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" > "${copy_dir}.tmp/manifest"
sync
# The previous copy is replaced only once the new one is whole.
rm -rf "${copy_dir}.old"
if [[ -d "${copy_dir}" ]]; then mv "${copy_dir}" "${copy_dir}.old"; fi
mv "${copy_dir}.tmp" "${copy_dir}"
rm -rf "${copy_dir}.old"
bytes=$(du -sb "${copy_dir}/data" | cut -f1)

flock -u 9
exec 9>&-
restart
paused_ms=$(($(now_ms) - stopped_ms))
[[ ${was_active} -eq 1 ]] || paused_ms=0
echo "IMGBUILD_RESULT status=ok token=${token} version=${version} paused_ms=${paused_ms} bytes=${bytes} was_running=${was_active}"
