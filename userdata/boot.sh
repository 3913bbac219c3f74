#!/bin/bash
# imgbuild boot: runs once per instance. Resolves the deploy-time values, writes the fstab line
# and the env file, starts chroma.service (which mounts EFS, checks the guards and takes the
# writer lock on every start), then signals the stack. Downloads nothing.
set -euo pipefail

root="${IMGBUILD_ROOT:-}"
readonly imds_endpoint="${IMDS_ENDPOINT:-http://169.254.169.254}"
readonly chroma_endpoint="${IMGBUILD_CHROMA_ENDPOINT:-http://127.0.0.1:{{ port }}}"
# Every call below is bounded; the heartbeat wait stops at this deadline.
readonly deadline=$((SECONDS + {{ boot_secs }}))

log() { echo "imgbuild-boot: $*" >&2; }

# Instance metadata over IMDSv2 (tokens are required by the launch template).
imds() {
  local token
  token=$(curl -fsS --max-time 5 --retry 3 -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 300" \
    "${imds_endpoint}/latest/api/token") || return 1
  curl -fsS --max-time 5 --retry 3 -H "X-aws-ec2-metadata-token: ${token}" \
    "${imds_endpoint}/latest/meta-data/$1"
}

{# The readiness signal the stack's CreationPolicy waits for: once per boot, from the EXIT trap
   when the boot gives up. The CLI exits 255 when the request did not get through and 254 when
   CloudFormation answered with an error; only the first is worth another try (AWS CLI user guide,
   "Command line return codes"). -#}
region="{{ region }}" instance_id="" stack_name="" signal_resource="" signalled=""
signal() {
  [[ -z "${signalled}" ]] || return 0
  signalled="$1"
  if [[ -z "${stack_name}" || -z "${signal_resource}" || -z "${region}" || -z "${instance_id}" ]]; then
    log "not signalling $1: no {{ stack_tag }} / {{ signal_tag }} instance tags (not launched by the stack) or no region / instance id"
    return 0
  fi
  local attempt rc
  for attempt in 1 2 3; do
    rc=0
    timeout 60 aws cloudformation signal-resource --region "${region}" --stack-name "${stack_name}" \
      --logical-resource-id "${signal_resource}" --unique-id "${instance_id}" --status "$1" \
      --cli-connect-timeout 10 --cli-read-timeout 20 >/dev/null || rc=$?
    if [[ ${rc} -eq 0 ]]; then
      log "signalled $1 to ${signal_resource} in stack ${stack_name}"
      return 0
    fi
    [[ ${rc} -eq 255 || ${rc} -eq 124 ]] || break
    sleep $((attempt * 5))
  done
  log "could not signal $1 to ${signal_resource} in stack ${stack_name}: the AWS CLI exited ${rc}"
}
die() { log "error: $*"; exit 1; }
trap 'rc=$?; [[ ${rc} -eq 0 ]] || signal FAILURE' EXIT

[[ -n "${region}" ]] || region=$(imds placement/region) || region=""
instance_id=$(imds instance-id) || instance_id=""
stack_name=$(imds tags/instance/{{ stack_tag }}) || stack_name=""
signal_resource=$(imds tags/instance/{{ signal_tag }}) || signal_resource=""

# cloud-init runs this MIME part even after the install part failed.
[[ -f "${root}{{ install_marker }}" ]] \
  || die "the install did not complete ({{ install_marker }} is missing): not starting Chroma; see /var/log/cloud-init-output.log"
[[ -n "${region}" ]] || die "could not read the region from instance metadata"

{# Deploy-time values: taken from the config when it names them, otherwise read at boot from
   instance metadata (the stack tags the instance with its file system id). -#}
file_system_id="{{ file_system_id }}"
if [[ -z "${file_system_id}" ]]; then
  file_system_id=$(imds tags/instance/{{ efs_tag }}) \
    || die "no EFS file system id: set efs.file_system_id, or tag the instance {{ efs_tag }} with metadata tags enabled"
fi
[[ "${file_system_id}" =~ ^fs-[0-9a-f]{8,40}$ ]] || die "'${file_system_id}' is not an EFS file system id"
domain=$(imds services/domain) || domain=amazonaws.com

{# EFS on the host in both modes: the writer lock and the guards live there. nofail: a boot never
   waits on EFS; chroma.service mounts it, retrying, on every start. -#}
readonly mount_point="{{ mount_point }}"
install -d -m 0755 "${root}${mount_point}"
{%- if efs_tls %}
fstab_line="${file_system_id}:/ ${mount_point} efs _netdev,noresvport,tls,iam,nofail 0 0"
{%- else %}
fstab_line="${file_system_id}.efs.${region}.${domain}:/ ${mount_point} nfs4 {{ nfs_options }},_netdev,nofail 0 0"
{%- endif %}
if ! grep -qF " ${mount_point} " "${root}/etc/fstab" 2>/dev/null; then
  echo "${fstab_line}" >> "${root}/etc/fstab"
fi

install -d -m 0755 "${root}/etc/imgbuild"
cat > "${root}{{ env_file }}" <<EOF_ENV
EFS_FILE_SYSTEM_ID=${file_system_id}
AWS_REGION=${region}
{{ efs_dns_var }}=${file_system_id}.efs.${region}.${domain}
EOF_ENV

systemctl daemon-reload
systemctl enable --now chroma.service
{%- if cloudwatch_agent %}

# The CloudWatch agent feeds the memory and disk alarms; Chroma serves without it.
agent_ctl="${root}{{ agent_ctl }}"
if [[ ! -x "${agent_ctl}" ]]; then
  agent="warning: missing (no ${agent_ctl#"${root}"})"
elif agent=$(timeout 120 "${agent_ctl}" -a fetch-config -m ec2 -s -c "file:${root}{{ agent_config }}" 2>&1); then
  agent="running, configured from {{ agent_config }}"
else
  agent="warning: failed (exit $?: ${agent##*$'\n'})"
fi
[[ "${agent}" == running* ]] || agent+="; the memory and disk alarms get no data"
log "CloudWatch agent: ${agent}"
if mkdir -p "${root}{{ status_dir }}"; then echo "${agent}" > "${root}{{ agent_status }}"; fi
{%- endif %}

attempt=0
while ((SECONDS < deadline)); do
  attempt=$((attempt + 1))
  if [[ -s "${root}{{ refused_file }}" ]]; then
    die "chroma.service refused to start: $(cat "${root}{{ refused_file }}")"
  fi
  if curl -fsS --max-time 5 -o /dev/null "${chroma_endpoint}{{ heartbeat_path }}"; then
    log "Chroma {{ chroma_version }} answers on {{ heartbeat_path }} (after ${attempt} tries)"
    signal SUCCESS
    exit 0
  fi
  sleep 5
done
die "Chroma did not answer {{ heartbeat_path }} within {{ boot_secs }}s (another instance may hold the writer lock); see journalctl -u chroma.service"
