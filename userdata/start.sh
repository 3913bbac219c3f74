#!/bin/bash
# imgbuild start: chroma.service runs this on every start (first boot, reboot, restart). It mounts
# EFS, refuses to serve from anything else, takes the writer lock on EFS and re-creates the Chroma
# container in the foreground: systemd is Chroma's only supervisor.
set -euo pipefail

root="${IMGBUILD_ROOT:-}"
readonly mount_point="${root}{{ mount_point }}"
readonly data_dir="${mount_point}/{{ data_subdir }}"
readonly lock_file="${mount_point}/{{ lock_name }}"
readonly version_file="${mount_point}/{{ version_name }}"
readonly version="{{ chroma_version }}"
readonly refused="${root}{{ refused_file }}"

log() { echo "imgbuild-start: $*" >&2; }
{# A guard's refusal needs a person: exit 3 stops systemd's retries (RestartPreventExitStatus) and
   the reason is left where the boot script reads it to signal the stack. -#}
refuse() {
  log "refusing to start Chroma: $*"
  install -d -m 0755 "${refused%/*}"
  printf '%s\n' "$*" > "${refused}"
  exit 3
}
rm -f "${refused}"

[[ -f "${root}{{ install_marker }}" ]] || refuse "the install did not complete ({{ install_marker }} is missing)"

{# The fstab line has nofail, so a boot never waits on EFS; a new mount target or a slow EFS after
   a reboot answers in minutes. Retry with back-off, then fail: Restart= starts this script again. -#}
attempt=1
until mountpoint -q "${mount_point}"; do
  if [[ ${attempt} -gt 8 ]]; then
    log "EFS is not mounted on ${mount_point} after 8 attempts; systemd retries"
    exit 1
  fi
  timeout 90 mount "${mount_point}" || log "mounting ${mount_point} failed (attempt ${attempt} of 8)"
  if ! mountpoint -q "${mount_point}"; then
    sleep $((attempt < 6 ? attempt * 5 : 30))
  fi
  attempt=$((attempt + 1))
done

{# One Chroma writer per file system, in both storage modes: SQLite on NFS takes one writer. The
   lock stays held by compose (fd 9) for as long as Chroma runs; NFSv4 leases free a dead holder's. -#}
exec 9>>"${lock_file}"
if ! flock -n 9; then
  log "another instance holds ${lock_file}; waiting up to 600s"
  flock -w 600 9 || { log "the writer lock is still held after 600s; systemd retries"; exit 1; }
fi

# Guards, under the lock so two instances never check and write at once.
install -d -m 0755 "${data_dir}"
on=$(findmnt -n -o TARGET --target "${data_dir}") || on=""
[[ "${on}" == "${mount_point}" ]] \
  || refuse "${data_dir} is on ${on:-no file system}, not on the EFS mount ${mount_point}: Chroma would write to the wrong disk"
if [[ ! -e "${data_dir}/chroma.sqlite3" ]]; then
  other=$(timeout 60 find -H "${mount_point}" -maxdepth 3 -path "${data_dir}" -prune -o -name chroma.sqlite3 -print -quit) || other=""
  [[ -z "${other}" ]] \
    || refuse "${data_dir} has no Chroma database but ${other} does (written by another storage mode or path): stop every instance, move that database's directory contents into ${data_dir}, then systemctl restart chroma.service"
fi
if [[ -s "${version_file}" ]]; then
  last=$(head -n 1 "${version_file}")
  if [[ "$(printf '%s\n%s\n' "${last}" "${version}" | sort -V | tail -n 1)" != "${version}" ]]; then
    refuse "the data was last opened by Chroma ${last}, newer than this image's ${version}; Chroma's migrations only go forward: deploy ${last} or newer"
  fi
fi
printf '%s\n' "${version}" > "${version_file}"

log "EFS mounted on ${mount_point}, writer lock held, serving Chroma ${version} from ${data_dir}"
{# --force-recreate: a container left from before a restart never keeps serving whatever was under
   the mount point when it started. -#}
exec docker compose --project-name chroma --env-file "${root}{{ env_file }}" -f "${root}{{ compose_path }}" \
  up --force-recreate --remove-orphans
