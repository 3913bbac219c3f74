//! `imgbuild fleet` against a moto server: a self-managed StackSet in three regions of moto's one
//! account (create, no change, update, status, destroy keeping the file systems), with the image
//! each region's `bake --regions` handed over. moto 5.2.5 runs CreateStackSet,
//! CreateStackInstances, UpdateStackSet, UpdateStackInstances, DescribeStackInstance,
//! ListStackInstances and DeleteStackInstances, and deploys each instance's stack for real (named
//! `StackSet:<set>` there), so the product's template is replaced by tests/fixtures/moto-fleet.yaml,
//! which moto can run. What moto cannot do (DetectStackSetDrift, failed operations, organizational
//! units) is scripted in fleet_mocks.rs.

use std::path::Path;

use aws_config::BehaviorVersion;

use crate::services;
use crate::support::imgbuild;
use crate::support::{moto_sdk as sdk, rt};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/moto-fleet.yaml");
/// moto's account.
const ACCOUNT: &str = "123456789012";
const REGIONS: [&str; 3] = ["us-east-1", "us-west-2", "eu-west-1"];

/// What `bake --regions` leaves in a region: an image this account owns, and the handoff
/// parameter naming it. Returns the image id.
fn bake_into(url: &str, region: &str, project: &str) -> String {
    rt().block_on(async {
        let conf = sdk(url, region).await;
        let ssm = aws_sdk_ssm::Client::new(&conf);
        let ec2 = aws_sdk_ec2::Client::new(&conf);
        let base = ssm.get_parameter().name("/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64").send().await.unwrap();
        let base = base.parameter().unwrap().value().unwrap().to_string();
        let run = ec2.run_instances().image_id(&base).min_count(1).max_count(1).instance_type(aws_sdk_ec2::types::InstanceType::T3aSmall).send().await.unwrap();
        let instance = run.instances()[0].instance_id().unwrap().to_string();
        let image = ec2.create_image().instance_id(&instance).name(format!("{project}-{region}")).send().await.unwrap().image_id().unwrap().to_string();
        ec2.terminate_instances().instance_ids(&instance).send().await.unwrap();
        ssm.put_parameter()
            .name(format!("/imgbuild/{project}/ami"))
            .value(&image)
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .data_type("aws:ec2:image")
            .overwrite(true)
            .send()
            .await
            .unwrap();
        image
    })
}

/// The outputs of the stack moto made for the instance in `region`.
fn instance_outputs(url: &str, region: &str, set: &str) -> Option<std::collections::BTreeMap<String, String>> {
    rt().block_on(async {
        let cfn = aws_sdk_cloudformation::Client::new(&sdk(url, region).await);
        let out = cfn.describe_stacks().send().await.unwrap();
        let s = out
            .stacks()
            .iter()
            .find(|s| s.stack_name() == Some(&format!("StackSet:{set}")) && s.stack_status().map(|x| x.as_str()) != Some("DELETE_COMPLETE"))?;
        Some(imgbuild::stack::outputs_of(s))
    })
}

fn file_system_exists(url: &str, region: &str, id: &str) -> bool {
    rt().block_on(async {
        let efs = aws_sdk_efs::Client::new(&sdk(url, region).await);
        efs.describe_file_systems().file_system_id(id).send().await.is_ok_and(|o| !o.file_systems().is_empty())
    })
}

fn project(name: &str, extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "name: {name}\nregion: us-east-1\naws:\n  poll_interval_secs: 1\nfleet:\n  accounts: [{ACCOUNT}]\n  regions: [{}]\n  max_concurrent: 2\n  failure_tolerance: 1\n{extra}",
        REGIONS.join(", ")
    );
    std::fs::write(dir.path().join("imgbuild.yaml"), config).unwrap();
    dir
}

fn fleet(dir: &Path, url: &str, args: &[&str]) -> (bool, serde_json::Value, String) {
    let out = imgbuild(dir).args(["--endpoint-url", url, "--output", "json", "fleet"]).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let doc = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}\n{err}", String::from_utf8_lossy(&out.stdout)));
    (out.status.success(), doc, err)
}

/// The done-when of issue 14: deploy, status and destroy end to end in three regions, each
/// region's instance running the image handed over in that region (`ImageParameter` names the
/// handoff parameter; CloudFormation resolves an `AWS::SSM::Parameter::Value<AWS::EC2::Image::Id>`
/// parameter in the instance's own region, "Specify existing resources at runtime with
/// CloudFormation-supplied parameter types", CloudFormation User Guide), and the file systems
/// kept.
#[test]
fn deploy_no_change_update_status_and_destroy_in_three_regions() {
    let Some(moto) = services::moto() else { return };
    let url = &moto.url;
    let name = "fleet-e2e";
    let images: Vec<String> = REGIONS.iter().map(|r| bake_into(url, r, name)).collect();
    let dir = project(name, "");
    let deploy = ["deploy", "--yes", "--no-tools", "--template", FIXTURE];

    let (ok, doc, err) = fleet(dir.path(), url, &deploy);
    assert!(ok, "{err}");
    for r in REGIONS {
        assert!(err.contains(&format!("+ create  {ACCOUNT} in {r}")), "{err}");
    }
    let ops = doc["operations"].as_array().unwrap();
    // One operation creates every instance (per-target overrides are tested with scripted answers
    // in fleet_mocks.rs: moto 5.2.5 gives an instance created with ParameterOverrides only those
    // parameters, where CloudFormation overrides the StackSet's values).
    assert_eq!(ops.iter().map(|o| o["action"].as_str().unwrap()).collect::<Vec<_>>(), ["CREATE"], "{doc:#}");
    assert_eq!(ops[0]["status"], "SUCCEEDED", "{doc:#}");
    assert_eq!(ops[0]["results"].as_array().unwrap().len(), 3);
    for (r, image) in REGIONS.iter().zip(&images) {
        let outputs = instance_outputs(url, r, name).unwrap_or_else(|| panic!("no instance stack in {r}"));
        assert_eq!(outputs.get("Image"), Some(image), "{r} runs its own region's baked image");
    }
    assert_eq!(doc["images"].as_array().unwrap().iter().map(|i| i["image"].as_str().unwrap().to_string()).collect::<Vec<_>>(), images);

    // The same again: nothing to do, nothing started.
    let (ok, doc, err) = fleet(dir.path(), url, &deploy);
    assert!(ok, "{err}");
    assert_eq!(doc["executed"], false, "{doc:#}");
    assert!(doc["targets"].as_array().unwrap().iter().all(|t| t["action"] == "no_change"), "{doc:#}");
    assert!(err.contains("no changes"), "{err}");

    // A region dropped from the targets is left as it is, and said so: removing instances is
    // destroy's, asked for by name.
    let fewer = ["deploy", "--yes", "--no-tools", "--template", FIXTURE, "--regions", "us-east-1,us-west-2"];
    let (ok, doc, err) = fleet(dir.path(), url, &fewer);
    assert!(ok, "{err}");
    assert_eq!(doc["executed"], false, "{doc:#}");
    assert!(err.contains(&format!("{ACCOUNT} in eu-west-1 is an instance of stack set {name} but not among the fleet's targets")), "{err}");
    assert!(instance_outputs(url, "eu-west-1", name).is_some());

    // Another port is an update of the StackSet, and with it of every instance.
    let text = std::fs::read_to_string(dir.path().join("imgbuild.yaml")).unwrap() + "chroma:\n  port: 8080\n";
    std::fs::write(dir.path().join("imgbuild.yaml"), text).unwrap();
    let (ok, doc, err) = fleet(dir.path(), url, &deploy);
    assert!(ok, "{err}");
    assert!(doc["targets"].as_array().unwrap().iter().all(|t| t["action"] == "update"), "{doc:#}");
    assert_eq!(doc["operations"][0]["action"], "UPDATE");
    assert_eq!(doc["operations"].as_array().unwrap().len(), 1, "{doc:#}");

    let (ok, doc, err) = fleet(dir.path(), url, &["status"]);
    assert!(ok, "{err}");
    let rows = doc["instances"].as_array().unwrap();
    assert_eq!(rows.len(), 3, "{doc:#}");
    for (r, image) in REGIONS.iter().zip(&images) {
        let row = rows.iter().find(|i| i["region"] == *r).unwrap();
        assert_eq!(row["account"], ACCOUNT);
        assert_eq!(row["status"], "CURRENT");
        assert_eq!(row["image"], image.as_str(), "{doc:#}");
    }
    assert_eq!(doc["last_operation"]["status"], "SUCCEEDED", "{doc:#}");

    let file_systems: Vec<(String, String)> =
        REGIONS.iter().map(|r| (r.to_string(), instance_outputs(url, r, name).unwrap()["FileSystemId"].clone())).collect();
    let (ok, doc, err) = fleet(dir.path(), url, &["destroy", "--yes"]);
    assert!(ok, "{err}");
    assert_eq!(doc["deleted_stack_set"], true, "{doc:#}");
    assert_eq!(doc["kept"].as_array().unwrap().len(), 3);
    for (r, fs) in &file_systems {
        assert!(instance_outputs(url, r, name).is_none(), "the instance stack in {r} is gone");
        assert!(file_system_exists(url, r, fs), "{fs} in {r} was kept");
        assert!(err.contains(&format!("in {ACCOUNT} {r}")) || err.contains(&format!("of {ACCOUNT} in {r}")), "{err}");
    }
    let (ok, doc, _) = fleet(dir.path(), url, &["status"]);
    assert!(ok);
    assert_eq!(doc["exists"], false);
}

/// A customer-managed key in `region` (KMS keys are regional); its ARN.
fn create_key(url: &str, region: &str) -> String {
    rt().block_on(async {
        let kms = aws_sdk_kms::Client::new(&sdk(url, region).await);
        kms.create_key().description("imgbuild fleet test").send().await.unwrap().key_metadata().unwrap().arn().unwrap().to_string()
    })
}

/// The handoff parameter in `region` as `account` sees it (moto maps credentials from an
/// AssumeRole into that account to it).
fn parameter_in(url: &str, account: &str, region: &str, name: &str) -> Option<String> {
    rt().block_on(async {
        let sts = aws_sdk_sts::Client::new(&sdk(url, region).await);
        let role = format!("arn:aws:iam::{account}:role/imgbuild-fleet-test");
        let c = sts.assume_role().role_arn(role).role_session_name("imgbuild-test").send().await.unwrap();
        let c = c.credentials().unwrap();
        let creds = aws_sdk_ssm::config::Credentials::new(c.access_key_id(), c.secret_access_key(), Some(c.session_token().to_string()), None, "assumed");
        let conf = aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(url)
            .region(aws_config::Region::new(region.to_string()))
            .credentials_provider(creds)
            .load()
            .await;
        let ssm = aws_sdk_ssm::Client::new(&conf);
        ssm.get_parameter().name(name).send().await.ok().and_then(|o| o.parameter().and_then(|p| p.value()).map(String::from))
    })
}

/// The image in every account (issue 14): in a fleet of moto's account and another one, the
/// other account's instance in each region gets the shared image as ImageId and writes the
/// handoff parameter there itself (the template's ImageHandoff, under WritesImage, which only
/// fleet overrides for other accounts set); the baking account's parameter stays bake's. Each
/// region's key (one per region, bake.kms_key_ids) grants the other account's Auto Scaling role.
/// moto runs the instance stacks in the target account (SELF_MANAGED instances are created in
/// that account's CloudFormation), with tests/fixtures/moto-fleet.yaml, which carries the
/// product's three pieces unchanged (checked below).
#[test]
fn a_cross_account_fleet_writes_the_handoff_parameter_in_the_other_account() {
    const OTHER: &str = "222222222222";
    // The fixture's ImageHandoff pieces are the product's.
    let product: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/infra/stack.yaml")).unwrap()).unwrap();
    let fixture: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(FIXTURE).unwrap()).unwrap();
    for (section, key) in [("Parameters", "ImageParameterName"), ("Conditions", "WritesImage"), ("Resources", "ImageHandoff")] {
        assert_eq!(fixture[section][key], product[section][key], "{section}.{key}");
        assert!(!product[section][key].is_null(), "{section}.{key}");
    }

    let Some(moto) = services::moto() else { return };
    let url = &moto.url;
    let name = "fleet-x";
    let images: Vec<String> = REGIONS.iter().map(|r| bake_into(url, r, name)).collect();
    let keys: Vec<String> = REGIONS.iter().map(|r| create_key(url, r)).collect();
    let dir = tempfile::tempdir().unwrap();
    // grants_from: key-account: moto 5.2.5 assumes the other account's execution role, but a
    // CreateGrant from that account on this account's key (by ARN) answers HTTP 500 with no error
    // code (measured 2026-11-29): moto's KMS does not follow a cross-account key. The grant made
    // from the target account is tested with scripted answers (fleet_mocks.rs).
    let config = format!(
        "name: {name}\nregion: us-east-1\naws:\n  poll_interval_secs: 1\nbake:\n  kms_key_id: {}\n  kms_key_ids:\n    {}: {}\n    {}: {}\n\
         fleet:\n  accounts: [\"{ACCOUNT}\", \"{OTHER}\"]\n  regions: [{}]\n  max_concurrent: 2\n  failure_tolerance: 1\n  grants_from: key-account\n",
        keys[0],
        REGIONS[1],
        keys[1],
        REGIONS[2],
        keys[2],
        REGIONS.join(", ")
    );
    std::fs::write(dir.path().join("imgbuild.yaml"), config).unwrap();

    let (ok, doc, err) = fleet(dir.path(), url, &["deploy", "--yes", "--no-tools", "--template", FIXTURE]);
    assert!(ok, "{err}");
    let grants = doc["grants"].as_array().unwrap();
    assert_eq!(grants.len(), 3, "{doc:#}");
    for (g, key) in grants.iter().zip(&keys) {
        assert_eq!((g["account"].as_str(), g["state"].as_str(), g["key"].as_str()), (Some(OTHER), Some("created"), Some(key.as_str())), "{doc:#}");
        assert_eq!(g["from_account"].as_str(), Some(ACCOUNT), "{doc:#}");
    }
    // The plan says from where each grant is made.
    assert!(
        err.contains(&format!("+ grant  {OTHER} in us-east-1: use of {} to its AWSServiceRoleForAutoScaling, from the key's account {ACCOUNT}", keys[0])),
        "{err}"
    );
    for (i, r) in REGIONS.iter().enumerate() {
        let shared = doc["images"][i]["image"].as_str().unwrap().to_string();
        assert_eq!(doc["images"][i]["region"], *r);
        assert_eq!(parameter_in(url, OTHER, r, &format!("/imgbuild/{name}/ami")), Some(shared), "{r}: the other account's stack wrote it");
        assert_eq!(parameter_in(url, ACCOUNT, r, &format!("/imgbuild/{name}/ami")), Some(images[i].clone()), "{r}: bake's own parameter is untouched");
    }

    // Removing the other account takes back what it was given.
    let (ok, doc, err) = fleet(dir.path(), url, &["destroy", "--yes", "--accounts", OTHER]);
    assert!(ok, "{err}");
    assert_eq!(doc["revoked_grants"].as_array().map(Vec::len), Some(3), "{doc:#}");
    assert_eq!(doc["unshared"].as_array().map(Vec::len), Some(3), "{doc:#}");
}

/// Without a baked image in one region, nothing is created: the parameter `bake --regions`
/// writes is missing there, and the error names the region and the command that fixes it.
#[test]
fn a_region_without_the_baked_image_is_refused_before_anything_changes() {
    let Some(moto) = services::moto() else { return };
    let url = &moto.url;
    let name = "fleet-noimage";
    bake_into(url, "us-east-1", name);
    bake_into(url, "us-west-2", name);
    let dir = project(name, "");
    let (ok, doc, err) = fleet(dir.path(), url, &["deploy", "--yes", "--no-tools", "--template", FIXTURE]);
    assert!(!ok);
    assert_eq!(doc["error"]["exit_code"], 2, "{doc:#}");
    assert!(err.contains("region eu-west-1 has no baked image") && err.contains("imgbuild bake --regions eu-west-1"), "{err}");
    let exists = rt().block_on(async {
        let cfn = aws_sdk_cloudformation::Client::new(&sdk(url, "us-east-1").await);
        imgbuild::stack::fleet::describe_set(&cfn, name).await.unwrap().is_some()
    });
    assert!(!exists, "no stack set was created");
}

/// `validate` refuses a fleet of several accounts without bake.kms_key_id, saying why: an image
/// encrypted with the AWS managed `aws/ebs` key cannot be shared with another account ("Share an
/// AMI with specific AWS accounts", Amazon EC2 User Guide). With a key it passes; an unquoted
/// account id with a leading zero (a YAML number) keeps its 12 digits.
#[test]
fn validate_refuses_a_cross_account_fleet_without_a_customer_managed_key() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = "fleet:\n  accounts: [012345678901, 222222222222]\n  regions: [us-east-1]\n";
    std::fs::write(dir.path().join("imgbuild.yaml"), fleet).unwrap();
    let out = imgbuild(dir.path()).args(["validate", "--no-tools"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("`bake.kms_key_id`") && err.contains("aws/ebs") && err.contains("cannot be shared"), "{err}");

    let key = "bake:\n  kms_key_id: arn:aws:kms:us-east-1:111111111111:key/1234abcd-12ab-34cd-56ef-1234567890ab\n";
    std::fs::write(dir.path().join("imgbuild.yaml"), format!("{fleet}{key}")).unwrap();
    let out = imgbuild(dir.path()).args(["validate", "--no-tools"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let config = imgbuild::config::parse(&format!("{fleet}{key}"), "t.yaml").unwrap();
    assert_eq!(config.fleet.accounts, ["012345678901", "222222222222"]);

    // KMS keys are regional: a single-region key of us-east-1 cannot encrypt the image in
    // eu-west-1; that region's key goes in bake.kms_key_ids (a multi-region key needs none).
    let two_regions = "fleet:\n  accounts: [012345678901, 222222222222]\n  regions: [us-east-1, eu-west-1]\n";
    std::fs::write(dir.path().join("imgbuild.yaml"), format!("{two_regions}{key}")).unwrap();
    let out = imgbuild(dir.path()).args(["validate", "--no-tools"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("bake.kms_key_ids.eu-west-1") && err.contains("KMS keys are regional"), "{err}");
    let per_region = "  kms_key_ids:\n    eu-west-1: arn:aws:kms:eu-west-1:111111111111:key/0e0e0e0e-aaaa-bbbb-cccc-dddddddddddd\n";
    std::fs::write(dir.path().join("imgbuild.yaml"), format!("{two_regions}{key}{per_region}")).unwrap();
    let out = imgbuild(dir.path()).args(["validate", "--no-tools"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mrk = "bake:\n  kms_key_id: arn:aws:kms:us-east-1:111111111111:key/mrk-1234abcd12ab34cd56ef1234567890ab\n";
    std::fs::write(dir.path().join("imgbuild.yaml"), format!("{two_regions}{mrk}")).unwrap();
    let out = imgbuild(dir.path()).args(["validate", "--no-tools"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let aws_managed = "bake:\n  kms_key_id: alias/aws/ebs\n";
    std::fs::write(dir.path().join("imgbuild.yaml"), format!("{fleet}{aws_managed}")).unwrap();
    let out = imgbuild(dir.path()).args(["validate", "--no-tools"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("aws/ebs cannot be shared"));
}

/// Bad fleet input is a clear usage error (exit 2) naming the field, never a panic.
#[test]
fn bad_fleet_settings_name_their_field() {
    let dir = tempfile::tempdir().unwrap();
    let yaml =
        "fleet:\n  accounts: [\"1234\"]\n  organizational_units: [ou-bad]\n  regions: [us-east-1, us-east-1]\n  max_concurrent: 0\n  failure_tolerance: 120%\n";
    std::fs::write(dir.path().join("imgbuild.yaml"), yaml).unwrap();
    let out = imgbuild(dir.path()).args(["validate", "--no-tools"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    for field in [
        "fleet.accounts[0]",
        "fleet.organizational_units[0]",
        "fleet.regions[1]",
        "fleet.max_concurrent",
        "fleet.failure_tolerance",
        "fleet.organizational_units`",
    ] {
        assert!(err.contains(field), "{field}: {err}");
    }
    // No targets: deploy says what to set, before any AWS call.
    std::fs::write(dir.path().join("imgbuild.yaml"), "fleet:\n  regions: [us-east-1]\n").unwrap();
    let out = imgbuild(dir.path()).args(["--endpoint-url", "http://127.0.0.1:9", "fleet", "deploy", "--yes"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no target accounts: set fleet.accounts or pass --accounts"));
}

/// `fleet.grants_from`: a value it does not take names the field and the two it takes; a
/// service-managed fleet refuses target-account (its member accounts have no role imgbuild can
/// assume), naming the field and key-account; key-account there, or either on a self-managed
/// fleet, validates.
#[test]
fn grants_from_is_validated_with_its_field() {
    let dir = tempfile::tempdir().unwrap();
    let key = "bake:\n  kms_key_id: arn:aws:kms:us-east-1:111111111111:key/1234abcd-12ab-34cd-56ef-1234567890ab\n";
    let ou = "arn:aws:organizations::111111111111:ou/o-abcd1234ef/ou-ab12-cd34ef56";
    let validate = |yaml: &str| {
        std::fs::write(dir.path().join("imgbuild.yaml"), format!("{key}{yaml}")).unwrap();
        let out = imgbuild(dir.path()).args(["validate", "--no-tools"]).output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (code, err) = validate("fleet:\n  accounts: [\"111111111111\", \"222222222222\"]\n  regions: [us-east-1]\n  grants_from: target\n");
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("`fleet.grants_from`") && err.contains("`target-account`") && err.contains("`key-account`"), "{err}");
    let (code, err) = validate(&format!(
        "fleet:\n  permission_model: service-managed\n  organizational_units: [\"{ou}\"]\n  regions: [us-east-1]\n  grants_from: target-account\n"
    ));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("fleet.grants_from") && err.contains("key-account"), "{err}");
    for ok in [
        format!("fleet:\n  permission_model: service-managed\n  organizational_units: [\"{ou}\"]\n  regions: [us-east-1]\n  grants_from: key-account\n"),
        "fleet:\n  accounts: [\"111111111111\", \"222222222222\"]\n  regions: [us-east-1]\n  grants_from: key-account\n".to_string(),
        "fleet:\n  accounts: [\"111111111111\", \"222222222222\"]\n  regions: [us-east-1]\n  grants_from: target-account\n".to_string(),
    ] {
        let (code, err) = validate(&ok);
        assert_eq!(code, Some(0), "{ok}: {err}");
    }
}
