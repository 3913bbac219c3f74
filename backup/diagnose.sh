#!/bin/bash
# imgbuild logs: run on the Chroma instance through SSM Run Command, read-only. Prints what a
# person would otherwise SSH in for, one section after another, each headed by a marker line
# imgbuild splits on: cloud-init's status and output, chroma.service's journal, compose's view of
# the container and its last lines, the EFS mount, the writer lock, the boot guard's verdict.
# Nothing here fails the script: a missing tool or file is itself worth reporting. Credentials
# that reach a log are masked here already (and again by imgbuild before anything is shown).
set -uo pipefail

root="${IMGBUILD_ROOT:-}"
readonly mount_point="${root}${IMGBUILD_MOUNT_POINT:?}"
readonly lock_file="${mount_point}/${IMGBUILD_LOCK_NAME:?}"
readonly version_file="${mount_point}/${IMGBUILD_VERSION_NAME:?}"
readonly compose="${root}${IMGBUILD_COMPOSE:?}"
readonly refused="${root}${IMGBUILD_REFUSED:?}"
readonly marker="${root}${IMGBUILD_INSTALL_MARKER:?}"
readonly lines="${IMGBUILD_LINES:-200}"
readonly token="${IMGBUILD_TOKEN:?}"

section() { printf '===== imgbuild-logs %s =====\n' "$1"; }
mask() {
  sed -E \
    -e 's/(AWS_[A-Z_]*=)[^[:space:]"]+/\1<redacted>/g' \
    -e 's/((aws_secret_access_key|aws_session_token|aws_access_key_id)[[:space:]]*[=:][[:space:]]*)[^[:space:]"]+/\1<redacted>/Ig' \
    -e 's/(X-aws-ec2-metadata-token:[[:space:]]*)[^[:space:]"]+/\1<redacted>/Ig'
}

section cloud-init-status
if [[ -z "${root}" ]] && command -v cloud-init > /dev/null; then
  cloud-init status --long 2>&1
fi
for f in "${root}/run/cloud-init/status.json" "${root}/run/cloud-init/result.json"; do
  if [[ -f "${f}" ]]; then echo "${f#"${root}"}:" && cat "${f}"; else echo "${f#"${root}"}: missing"; fi
done

section cloud-init-output
tail -n "${lines}" "${root}/var/log/cloud-init-output.log" 2>&1 | mask

section chroma-journal
journalctl -u chroma.service -n "${lines}" --no-pager 2>&1 | mask

section compose-ps
docker compose -f "${compose}" ps --all 2>&1 | mask

section chroma-container
docker compose -f "${compose}" logs --no-color --tail "${lines}" 2>&1 | mask

section mount
if mountpoint -q "${mount_point}"; then
  echo "mounted: ${mount_point#"${root}"}"
else
  echo "not mounted: ${mount_point#"${root}"}"
fi

section writer-lock
if [[ ! -e "${lock_file}" ]]; then
  echo "absent: ${lock_file#"${root}"} (no Chroma ever started on this file system)"
elif flock -n -s "${lock_file}" true 2> /dev/null; then
  echo "free: ${lock_file#"${root}"} (no writer holds it)"
else
  echo "held: ${lock_file#"${root}"}"
fi
if [[ -s "${version_file}" ]]; then echo "data last opened by Chroma $(head -n 1 "${version_file}")"; fi

section boot-guard
if [[ -f "${marker}" ]]; then echo "install: complete ($(head -n 1 "${marker}"))"; else echo "install: incomplete (${IMGBUILD_INSTALL_MARKER} is missing)"; fi
if [[ -s "${refused}" ]]; then
  echo "refused: $(cat "${refused}")"
else
  echo "no refusal"
fi
if systemctl is-active --quiet chroma.service; then echo "chroma.service: active"; else echo "chroma.service: not active"; fi
# The boot's verdict on the CloudWatch agent sits next to the refusal (render::AGENT_STATUS_FILE).
agent_status="${refused%/*}/cloudwatch-agent"
if [[ -s "${agent_status}" ]]; then echo "cloudwatch agent: $(head -n 1 "${agent_status}")"; else echo "cloudwatch agent: not started by the boot (alarms off, or the boot has not reached it)"; fi

echo "IMGBUILD_LOGS_END token=${token}"
