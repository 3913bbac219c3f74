#!/bin/bash
# imgbuild boot: resolves the deploy-time values, {% if efs_tls %}mounts EFS with TLS, {% endif %}starts Chroma.
# Runs once per instance; it downloads nothing.
set -euo pipefail

log() { echo "imgbuild-boot: $*" >&2; }
die() { log "error: $*"; exit 1; }

# Instance metadata over IMDSv2 (tokens are required by the launch template).
imds() {
  local token
  token=$(curl -fsS --retry 3 -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 300" \
    http://169.254.169.254/latest/api/token)
  curl -fsS --retry 3 -H "X-aws-ec2-metadata-token: ${token}" \
    "http://169.254.169.254/latest/meta-data/$1"
}

# Deploy-time values: taken from the config when it names them, otherwise read at boot
# from instance metadata (the stack tags the instance with its file system id).
file_system_id="{{ file_system_id }}"
if [[ -z "${file_system_id}" ]]; then
  file_system_id=$(imds tags/instance/{{ efs_tag }}) \
    || die "no EFS file system id: set efs.file_system_id, or tag the instance {{ efs_tag }} with metadata tags enabled"
fi
[[ "${file_system_id}" =~ ^fs-[0-9a-f]{8,40}$ ]] || die "'${file_system_id}' is not an EFS file system id"
region="{{ region }}"
if [[ -z "${region}" ]]; then
  region=$(imds placement/region) || die "could not read the region from instance metadata"
fi
domain=$(imds services/domain) || domain=amazonaws.com
{% if efs_tls %}
# EFS on the host through amazon-efs-utils: TLS in transit, IAM authorization.
readonly mount_point="{{ mount_point }}"
install -d -m 0755 "${mount_point}"
if ! grep -q "^${file_system_id}:/ ${mount_point} " /etc/fstab; then
  echo "${file_system_id}:/ ${mount_point} efs _netdev,noresvport,tls,iam 0 0" >> /etc/fstab
fi
# A new mount target can take a few minutes to answer.
attempt=1
until mountpoint -q "${mount_point}"; do
  if ! mount "${mount_point}"; then
    [[ ${attempt} -lt 30 ]] || die "could not mount EFS ${file_system_id} on ${mount_point}"
    log "mounting ${file_system_id} failed (attempt ${attempt} of 30), retrying in 10s"
    sleep 10
    attempt=$((attempt + 1))
  fi
done
install -d -m 0755 "{{ host_data_dir }}"
{% endif %}
# Written last: chroma.service waits for this file (ConditionPathExists), so Chroma never starts
# on a data directory that is not the file system's.
install -d -m 0755 /etc/imgbuild
cat > {{ env_file }} <<EOF
EFS_FILE_SYSTEM_ID=${file_system_id}
AWS_REGION=${region}
{{ efs_dns_var }}=${file_system_id}.efs.${region}.${domain}
EOF

systemctl daemon-reload
systemctl enable --now chroma.service

# Report readiness in the boot log; the load balancer's health check is what admits traffic.
for attempt in $(seq 1 60); do
  if curl -fsS -o /dev/null "http://127.0.0.1:{{ port }}{{ heartbeat_path }}"; then
    log "Chroma {{ chroma_version }} answers on {{ heartbeat_path }} (after ${attempt} tries)"
    exit 0
  fi
  sleep 5
done
log "Chroma did not answer {{ heartbeat_path }} within 5 minutes{% if efs_tls %} (it may be waiting for the writer lock held by another instance){% endif %}; see journalctl -u chroma.service"
