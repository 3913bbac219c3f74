//! The `fleet:` section: the same stack in many accounts and regions through a CloudFormation
//! StackSet, and the checks its targets and operation preferences need.

use serde::{Deserialize, Serialize};

use super::{check_region, parse_cidr};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// The StackSet's name; defaults to the stack name.
    pub stack_set: Option<String>,
    /// `self-managed` (administration and execution roles, targets are accounts) or
    /// `service-managed` (AWS Organizations, targets are organizational units).
    pub permission_model: PermissionModel,
    /// Self-managed only; unset: AWSCloudFormationStackSetAdministrationRole of this account.
    pub administration_role_arn: Option<String>,
    /// Self-managed only; unset: AWSCloudFormationStackSetExecutionRole.
    pub execution_role_name: Option<String>,
    /// From which account the KMS grant for each other account's Auto Scaling role is made;
    /// unset: `target-account` for self-managed fleets, `key-account` for service-managed ones
    /// (see `grants_from()`).
    pub grants_from: Option<GrantsFrom>,
    #[serde(deserialize_with = "account_ids")]
    pub accounts: Vec<String>,
    pub organizational_units: Vec<String>,
    /// Deployed in this order.
    pub regions: Vec<String>,
    /// Targets deployed at once per region: a count (`20`) or a percentage (`10%`).
    #[serde(deserialize_with = "super::version_text")]
    pub max_concurrent: String,
    /// Failed targets per region before CloudFormation stops the operation: a count or a percentage.
    #[serde(deserialize_with = "super::version_text")]
    pub failure_tolerance: String,
    pub region_concurrency: RegionConcurrency,
    /// Parameter values for some targets only.
    pub overrides: Vec<FleetOverride>,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            stack_set: None,
            permission_model: PermissionModel::SelfManaged,
            administration_role_arn: None,
            execution_role_name: None,
            grants_from: None,
            accounts: Vec::new(),
            organizational_units: Vec::new(),
            regions: Vec::new(),
            max_concurrent: "1".into(),
            failure_tolerance: "0".into(),
            region_concurrency: RegionConcurrency::Sequential,
            overrides: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetOverride {
    /// The accounts it applies to (self-managed), or the accounts within the fleet's
    /// organizational units (service-managed).
    #[serde(deserialize_with = "account_ids")]
    pub accounts: Vec<String>,
    /// Empty: every fleet region.
    pub regions: Vec<String>,
    pub allowed_client_cidr: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PermissionModel {
    SelfManaged,
    ServiceManaged,
}

/// Where `fleet deploy` makes an account's KMS grant. AWS says to make it from the account that
/// owns the Auto Scaling group ("You must create AWS KMS grants from the account that owns the
/// Amazon EC2 Auto Scaling group, not the AWS KMS account", AWS Knowledge Center
/// kms-launch-ec2-instance; the EC2 Auto Scaling User Guide's cross-account example creates it
/// "from the external account"): `target-account`, through the StackSet execution role there.
/// `key-account` makes it from the key's account with the caller's own credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GrantsFrom {
    TargetAccount,
    KeyAccount,
}

impl FleetConfig {
    /// Where grants are made: as set, else from each target account when it has a role imgbuild
    /// can assume (self-managed: the StackSet execution role), else from the key's account
    /// (service-managed member accounts have no such role).
    pub fn grants_from(&self) -> GrantsFrom {
        match (self.grants_from, self.permission_model) {
            (Some(g), _) => g,
            (None, PermissionModel::SelfManaged) => GrantsFrom::TargetAccount,
            (None, PermissionModel::ServiceManaged) => GrantsFrom::KeyAccount,
        }
    }

    /// The StackSet execution role's name in the target accounts.
    pub fn execution_role(&self) -> &str {
        self.execution_role_name.as_deref().unwrap_or("AWSCloudFormationStackSetExecutionRole")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RegionConcurrency {
    Sequential,
    Parallel,
}

/// A StackSet operation preference: a count of targets or a percentage of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Amount {
    Count(i32),
    Percent(i32),
}

impl Amount {
    /// `20` or `5%`. `min` is the least count allowed (max concurrent starts at 1, a failure
    /// tolerance at 0).
    pub fn parse(text: &str, min: i32) -> std::result::Result<Self, String> {
        let t = text.trim();
        let (digits, percent) = match t.strip_suffix('%') {
            Some(d) => (d.trim(), true),
            None => (t, false),
        };
        let n: i32 = digits.parse().map_err(|_| format!("`{text}` is neither a count (such as 20) nor a percentage (such as 5%)"))?;
        if percent {
            if (min..=100).contains(&n) { Ok(Amount::Percent(n)) } else { Err(format!("{n}% is outside {min}% to 100%")) }
        } else if n >= min {
            Ok(Amount::Count(n))
        } else {
            Err(format!("{n} is below {min}"))
        }
    }
}

/// AWS account ids are 12 digits; YAML reads an unquoted one as a number (dropping leading zeros),
/// so numbers are taken back to their 12 digits.
fn account_ids<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id {
        Text(String),
        Number(u64),
    }
    let ids: Vec<Id> = Vec::deserialize(d)?;
    Ok(ids
        .into_iter()
        .map(|i| match i {
            Id::Text(s) => s,
            Id::Number(n) => format!("{n:012}"),
        })
        .collect())
}

pub fn check_account_id(id: &str) -> std::result::Result<(), String> {
    if id.len() == 12 && id.bytes().all(|b| b.is_ascii_digit()) { Ok(()) } else { Err(format!("`{id}` is not an AWS account id (12 digits)")) }
}

/// Organizational unit ids (`ou-` root part `-` unit part) or the root (`r-...`), as
/// CloudFormation's DeploymentTargets takes them.
fn check_ou(id: &str) -> std::result::Result<(), String> {
    let low = |s: &str, min: usize, max: usize| (min..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let ok = match id.strip_prefix("ou-") {
        Some(rest) => rest.split_once('-').is_some_and(|(a, b)| low(a, 4, 32) && low(b, 8, 32)),
        None => id.strip_prefix("r-").is_some_and(|r| low(r, 4, 32)),
    };
    if ok { Ok(()) } else { Err(format!("`{id}` is not an organizational unit id (ou-xxxx-xxxxxxxx) or root id (r-xxxx)")) }
}

/// A service-managed target: the id DeploymentTargets takes, and the ARN the image is shared
/// with (EC2 shares with organizational units by ARN: LaunchPermission.OrganizationalUnitArn; a
/// root by its organization's ARN, LaunchPermission.OrganizationArn).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrgTarget {
    pub id: String,
    pub share_arn: String,
    /// True for a root (the whole organization).
    pub organization: bool,
}

/// Reads `arn:aws:organizations::<management account>:ou/o-<org>/ou-...` (or `:root/o-<org>/r-...`).
/// A bare id is refused: the image could not be shared with it.
pub fn org_target(entry: &str) -> std::result::Result<OrgTarget, String> {
    let hint = "give it as its ARN, arn:aws:organizations::<management account>:ou/o-<organization>/ou-... (or :root/o-.../r-...), \
                so the image can be shared with it (EC2 shares with organizational units by ARN)";
    let parts: Vec<&str> = entry.split(':').collect();
    let ok_prefix = parts.len() == 6 && parts[0] == "arn" && parts[1].starts_with("aws") && parts[2] == "organizations" && parts[3].is_empty();
    if !ok_prefix {
        check_ou(entry)?;
        return Err(format!("`{entry}`: {hint}"));
    }
    check_account_id(parts[4]).map_err(|m| format!("`{entry}`: {m}"))?;
    let path: Vec<&str> = parts[5].split('/').collect();
    match path.as_slice() {
        ["ou", org, id] if org.starts_with("o-") && id.starts_with("ou-") => {
            check_ou(id)?;
            Ok(OrgTarget { id: id.to_string(), share_arn: entry.to_string(), organization: false })
        }
        ["root", org, id] if org.starts_with("o-") && id.starts_with("r-") => {
            check_ou(id)?;
            Ok(OrgTarget {
                id: id.to_string(),
                share_arn: format!("{}:{}:organizations::{}:organization/{org}", parts[0], parts[1], parts[4]),
                organization: true,
            })
        }
        _ => Err(format!("`{entry}` is not an organizational unit or root ARN: {hint}")),
    }
}

/// The fleet's own checks; `has_kms_key`: whether `bake.kms_key_id` is set.
pub fn check(f: &FleetConfig, has_kms_key: bool) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut bad = |field: String, message: String| out.push((field, message));
    if let Some(n) = &f.stack_set
        && let Err(m) = super::check_name(n)
    {
        bad("fleet.stack_set".into(), m);
    }
    for (i, a) in f.accounts.iter().enumerate() {
        if let Err(m) = check_account_id(a) {
            bad(format!("fleet.accounts[{i}]"), m);
        }
    }
    for (i, ou) in f.organizational_units.iter().enumerate() {
        if let Err(m) = org_target(ou) {
            bad(format!("fleet.organizational_units[{i}]"), m);
        }
    }
    for (i, r) in f.regions.iter().enumerate() {
        if let Err(m) = check_region(r) {
            bad(format!("fleet.regions[{i}]"), m);
        }
        if f.regions[..i].contains(r) {
            bad(format!("fleet.regions[{i}]"), format!("{r} is listed twice"));
        }
    }
    match f.permission_model {
        PermissionModel::SelfManaged if !f.organizational_units.is_empty() => bad(
            "fleet.organizational_units".into(),
            "a self-managed StackSet targets accounts; organizational units need permission_model: service-managed".into(),
        ),
        PermissionModel::ServiceManaged if !f.accounts.is_empty() => {
            bad("fleet.accounts".into(), "a service-managed StackSet targets organizational units (fleet.organizational_units), not accounts".into())
        }
        PermissionModel::ServiceManaged if f.grants_from == Some(GrantsFrom::TargetAccount) => bad(
            "fleet.grants_from".into(),
            "target-account needs a role imgbuild can assume in each target account (the self-managed StackSet execution role); \
             a service-managed fleet's member accounts have none: use key-account (the default there) and the key policy statement for the organization (README, Fleet)"
                .into(),
        ),
        PermissionModel::ServiceManaged if f.administration_role_arn.is_some() || f.execution_role_name.is_some() => bad(
            "fleet.permission_model".into(),
            "administration_role_arn and execution_role_name belong to self-managed StackSets; service-managed ones use AWS Organizations' roles".into(),
        ),
        _ => {}
    }
    if let Some(arn) = &f.administration_role_arn
        && !(arn.starts_with("arn:aws") && arn.contains(":iam::") && arn.contains(":role/"))
    {
        bad("fleet.administration_role_arn".into(), format!("`{arn}` is not an IAM role ARN"));
    }
    if let Err(m) = Amount::parse(&f.max_concurrent, 1) {
        bad("fleet.max_concurrent".into(), m);
    }
    if let Err(m) = Amount::parse(&f.failure_tolerance, 0) {
        bad("fleet.failure_tolerance".into(), m);
    }
    for (i, o) in f.overrides.iter().enumerate() {
        if o.accounts.is_empty() {
            bad(format!("fleet.overrides[{i}].accounts"), "name the accounts the override applies to".into());
        }
        for (j, a) in o.accounts.iter().enumerate() {
            if let Err(m) = check_account_id(a) {
                bad(format!("fleet.overrides[{i}].accounts[{j}]"), m);
            } else if f.permission_model == PermissionModel::SelfManaged && !f.accounts.contains(a) {
                bad(format!("fleet.overrides[{i}].accounts[{j}]"), format!("{a} is not one of fleet.accounts"));
            }
        }
        for (j, r) in o.regions.iter().enumerate() {
            if !f.regions.contains(r) {
                bad(format!("fleet.overrides[{i}].regions[{j}]"), format!("{r} is not one of fleet.regions"));
            }
        }
        if let Some(c) = &o.allowed_client_cidr {
            match parse_cidr(c) {
                Ok((_, 0)) => bad(format!("fleet.overrides[{i}].allowed_client_cidr"), "0.0.0.0/0 would open the API endpoint to every address".into()),
                Ok(_) => {}
                Err(m) => bad(format!("fleet.overrides[{i}].allowed_client_cidr"), m),
            }
        }
    }
    // An image encrypted with the AWS managed aws/ebs key cannot be shared with another account
    // ("Share an AMI with specific AWS accounts", Amazon EC2 User Guide): a fleet of several
    // accounts, or of organizational units, needs the image under a customer-managed key.
    if (f.accounts.len() > 1 || !f.organizational_units.is_empty()) && !has_kms_key {
        bad(
            "bake.kms_key_id".into(),
            "the fleet spans accounts, and an image encrypted with the AWS managed aws/ebs key cannot be shared with another account: \
             set bake.kms_key_id to a customer-managed KMS key whose policy lets the fleet's accounts use it"
                .into(),
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts() {
        assert_eq!(Amount::parse("20", 1), Ok(Amount::Count(20)));
        assert_eq!(Amount::parse("5%", 0), Ok(Amount::Percent(5)));
        assert_eq!(Amount::parse("0", 0), Ok(Amount::Count(0)));
        assert!(Amount::parse("0", 1).is_err());
        assert!(Amount::parse("101%", 0).is_err());
        assert!(Amount::parse("five", 0).is_err());
    }

    #[test]
    fn grants_from_defaults_to_the_target_account_where_a_role_can_be_assumed() {
        let mut f = FleetConfig::default();
        assert_eq!((f.grants_from(), f.execution_role()), (GrantsFrom::TargetAccount, "AWSCloudFormationStackSetExecutionRole"));
        f.permission_model = PermissionModel::ServiceManaged;
        assert_eq!(f.grants_from(), GrantsFrom::KeyAccount);
        f.grants_from = Some(GrantsFrom::TargetAccount);
        assert!(check(&f, true).iter().any(|(field, m)| field == "fleet.grants_from" && m.contains("key-account")));
    }

    #[test]
    fn organizational_units() {
        let ou = org_target("arn:aws:organizations::111111111111:ou/o-abcd1234ef/ou-ab12-cd34ef56").unwrap();
        assert_eq!((ou.id.as_str(), ou.organization), ("ou-ab12-cd34ef56", false));
        let root = org_target("arn:aws:organizations::111111111111:root/o-abcd1234ef/r-ab12").unwrap();
        assert_eq!((root.id.as_str(), root.share_arn.as_str()), ("r-ab12", "arn:aws:organizations::111111111111:organization/o-abcd1234ef"));
        assert!(org_target("ou-ab12-cd34ef56").unwrap_err().contains("give it as its ARN"));
        assert!(check_ou("ou-ab12-cd34ef56").is_ok());
        assert!(check_ou("r-ab12").is_ok());
        assert!(check_ou("ou-AB12-cd34ef56").is_err());
        assert!(check_ou("123456789012").is_err());
    }
}
