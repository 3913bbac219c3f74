//! Cost in the diff (issue 15, item 1): the monthly cost of what a change set adds and removes,
//! from the dated price table shipped with the tool. The figures asserted are the table's
//! (src/cost/prices.rs, 2026-11-29) times AWS's 730-hour pricing month: NAT gateway $0.045/h,
//! public IPv4 address $0.005/h (both billed from creation, traffic or not: Amazon VPC pricing),
//! interface endpoint $0.01/h per AZ (AWS PrivateLink pricing: "each VPC endpoint per AZ"),
//! NLB $0.0225/h, t3a.small $0.0188/h, gp3 $0.08/GB-month, EFS Standard $0.30/GB-month (Amazon
//! EFS pricing page).

use imgbuild::cost::{self, Inputs};
use imgbuild::stack::Change;
use imgbuild::stack::template::Template;

use crate::services;
use crate::support::imgbuild;

fn change(action: char, id: &str, kind: &str) -> Change {
    Change { action, logical_id: id.into(), resource_type: kind.into(), replacement: None }
}

fn inputs(region: &str) -> Inputs {
    Inputs::from_template(&Template::reference(), region, "t3a.small")
}

fn item(e: &cost::Estimate, id: &str) -> Vec<(char, f64)> {
    e.items.iter().filter(|i| i.resource == id).map(|i| (i.change, i.monthly_usd)).collect()
}

#[test]
fn the_real_template_is_sized_from_its_own_resources() {
    let i = inputs("us-east-1");
    // The execute-api endpoint has a network interface in each private subnet: two AZs.
    assert_eq!(i.endpoint_azs.get("ApiVpcEndpoint"), Some(&2));
    assert_eq!(i.asg_capacity.get("AutoScalingGroup"), Some(&1));
    assert_eq!(i.root_volume_gb, 15);
}

/// Going from a NAT gateway per AZ back to one: CloudFormation removes the second gateway and
/// its address (their Condition turns false), and the hours they cost go away.
#[test]
fn removals_are_negative_and_the_net_adds_up() {
    let changes =
        [change('-', "NatGatewayB", "AWS::EC2::NatGateway"), change('-', "NatEipB", "AWS::EC2::EIP"), change('~', "PrivateDefaultRouteB", "AWS::EC2::Route")];
    let e = cost::estimate(&changes, &inputs("us-east-1"));
    assert_eq!(item(&e, "NatGatewayB"), [('-', -32.85)]);
    assert_eq!(item(&e, "NatEipB"), [('-', -3.65)]);
    assert!(item(&e, "PrivateDefaultRouteB").is_empty(), "a route costs nothing");
    assert_eq!(e.monthly_usd, -36.5);
    let text = cost::lines(&e).join("\n");
    assert!(text.contains("- NatGatewayB (AWS::EC2::NatGateway): NAT gateway  -$32.85"), "{text}");
    assert!(text.contains("net: -$36.50/month"), "{text}");
    assert!(text.contains("2026-11-29"), "the table's date is said: {text}");
}

/// An instance type change replaces the instance: the old type's hours go, the new type's come.
#[test]
fn an_instance_type_change_is_priced_old_out_new_in() {
    let mut i = Inputs::from_template(&Template::reference(), "us-east-1", "t3a.medium");
    i.previous_instance_type = Some("t3a.small".into());
    let e =
        cost::estimate(&[change('~', "LaunchTemplate", "AWS::EC2::LaunchTemplate"), change('~', "AutoScalingGroup", "AWS::AutoScaling::AutoScalingGroup")], &i);
    assert_eq!(item(&e, "AutoScalingGroup"), [('~', -13.72), ('~', 27.45)]);
    assert_eq!(e.monthly_usd, 13.72);
}

/// The template keeps the file system when it leaves the stack (DeletionPolicy: Retain), so a
/// removal saves nothing; its storage is priced at the size DescribeFileSystems meters
/// (SizeInBytes.Value, aws-cli examples/efs/describe-file-systems.rst).
#[test]
fn the_file_system_is_priced_at_its_size_and_a_retained_one_saves_nothing() {
    let mut i = inputs("us-east-1");
    i.efs_bytes = Some(10 << 30);
    let e = cost::estimate(&[change('-', "FileSystem", "AWS::EFS::FileSystem")], &i);
    assert_eq!(item(&e, "FileSystem"), [('-', 0.0)]);
    let s = e.efs_storage.as_ref().unwrap();
    assert_eq!((s.size_bytes, s.monthly_usd), (10 << 30, 3.0));
}

/// The bake document's root volume is what a baked image snapshots at most.
#[test]
fn a_baked_image_costs_its_snapshots_at_most_the_documents_volume() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/images/bake.yaml")).unwrap();
    assert_eq!(cost::volume_gib(&doc), 15);
    let e = cost::snapshots("us-east-1", &[("ami-0new".into(), 15)], &[("ami-0old".into(), 15), ("ami-0older".into(), 8)]);
    assert_eq!(item(&e, "ami-0new"), [('+', 0.75)]);
    assert_eq!(item(&e, "ami-0older"), [('-', -0.4)]);
    assert_eq!(e.monthly_usd, -0.4);
}

#[test]
fn a_region_outside_the_table_gets_no_invented_figures() {
    let e = cost::estimate(&[change('+', "NatGatewayA", "AWS::EC2::NatGateway")], &inputs("ap-southeast-4"));
    assert!(e.items.is_empty());
    assert!(e.unpriced[0].contains("ap-southeast-4 is not in the price table"), "{:?}", e.unpriced);
    let mut i = inputs("us-east-1");
    i.instance_type = "x2iedn.32xlarge".into();
    let e = cost::estimate(&[change('+', "AutoScalingGroup", "AWS::AutoScaling::AutoScalingGroup")], &i);
    assert!(e.unpriced.iter().any(|u| u.contains("x2iedn.32xlarge")), "{:?}", e.unpriced);
    // A size the caller could not read is said, not silently left out.
    let mut i = inputs("us-east-1");
    i.notes.push("the file system's size: AccessDenied".into());
    assert_eq!(cost::estimate(&[], &i).unpriced, ["the file system's size: AccessDenied"]);
}

fn project(name: &str, nat: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("imgbuild.yaml"),
        format!("name: {name}\nregion: us-east-1\naws:\n  poll_interval_secs: 1\nstack:\n  nat_gateways: {nat}\n"),
    )
    .unwrap();
    dir
}

/// The change set moto computes for the real template, as `deploy --no-execute` shows it: the
/// cost lines come under the diff (before the change set is left for review or confirmed), and
/// `--output json` carries them under `cost`. One NAT gateway vs one per AZ is the template's
/// NatPerAz condition.
fn priced_deploy(stack: &str, nat: &str) -> (serde_json::Value, String) {
    let moto = services::moto().unwrap();
    let dir = project(stack, nat);
    let out = imgbuild(dir.path()).args(["--endpoint-url", &moto.url, "--output", "json", "deploy", "--no-execute", "--no-tools"]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cs = doc["deploy"]["change_set"].as_str().unwrap().to_string();
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let conf = aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(&moto.url)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_cloudformation::config::Credentials::new("testing", "testing", None, None, "tests"))
            .load()
            .await;
        let cfn = aws_sdk_cloudformation::Client::new(&conf);
        cfn.delete_change_set().change_set_name(&cs).send().await.unwrap();
        cfn.delete_stack().stack_name(stack).send().await.unwrap();
    });
    (doc, err)
}

fn json_items(doc: &serde_json::Value, id: &str) -> Vec<f64> {
    doc["cost"]["items"].as_array().unwrap().iter().filter(|i| i["resource"] == id).map(|i| i["monthly_usd"].as_f64().unwrap()).collect()
}

/// moto lists every resource of the template in a CREATE change set, conditions or not; real
/// CloudFormation leaves out those whose condition is false. With NAT gateways per AZ every
/// priced resource is in, so the two agree; the one-gateway case is the pure test below.
#[test]
fn deploy_prices_the_change_set_moto_computes_for_the_real_template() {
    if services::moto().is_none() {
        return;
    }
    let (doc, err) = priced_deploy("costperaz", "per-az");
    let cost = &doc["cost"];
    assert_eq!(cost["region"], "us-east-1");
    assert_eq!(cost["currency"], "USD");
    assert_eq!(cost["date"], "2026-11-29");
    assert!(cost["source"].as_str().unwrap().contains("price table"));
    assert_eq!(json_items(&doc, "NatGatewayA"), [32.85]);
    assert_eq!(json_items(&doc, "NatEipA"), [3.65]);
    assert_eq!(json_items(&doc, "NatGatewayB"), [32.85]);
    assert_eq!(json_items(&doc, "NatEipB"), [3.65]);
    assert_eq!(json_items(&doc, "ApiVpcEndpoint"), [14.6], "two AZs x $7.30");
    assert_eq!(json_items(&doc, "LoadBalancer"), [16.43]);
    assert_eq!(json_items(&doc, "AutoScalingGroup"), [13.72, 1.2], "t3a.small and its 15 GiB gp3 root volume");
    assert_eq!(json_items(&doc, "FileSystem"), [0.0], "a new file system starts empty");
    assert_eq!(cost["monthly_usd"], 118.95);
    let item = &cost["items"][0];
    for k in ["change", "resource", "resource_type", "what", "monthly_usd"] {
        assert!(item.get(k).is_some(), "{k} missing from {item}");
    }
    // Said under the diff, before the change set is left for review.
    let at = |s: &str| err.find(s).unwrap_or_else(|| panic!("{s:?} not in {err}"));
    assert!(at("+ ApiVpcEndpoint (AWS::EC2::VPCEndpoint)") < at("monthly cost of this change"));
    assert!(at("net: +$118.95/month") < at("--no-execute: change set"));
}

/// A CREATE change set of the real template as CloudFormation computes it: every resource
/// added, except those whose Condition is false ("Conditions" in the AWS CloudFormation User
/// Guide: CloudFormation creates a resource only when its condition is true).
fn create_change_set(false_conditions: &[&str]) -> Vec<Change> {
    let t = Template::reference();
    let resources = t.document()["Resources"].as_mapping().unwrap().clone();
    resources
        .iter()
        .filter(|(_, r)| r.get("Condition").and_then(|c| c.as_str()).is_none_or(|c| !false_conditions.contains(&c)))
        .map(|(id, r)| change('+', id.as_str().unwrap(), r["Type"].as_str().unwrap()))
        .collect()
}

/// `fleet deploy` prices a new target from the template alone: the resources whose condition
/// holds for the parameters it deploys with, as CloudFormation would create them.
#[test]
fn a_new_stack_is_the_templates_resources_whose_condition_holds() {
    let ids = |c: Vec<Change>| c.into_iter().map(|c| c.logical_id).collect::<std::collections::BTreeSet<_>>();
    let params = |nat: &str| std::collections::BTreeMap::from([("NatGateways".to_string(), nat.to_string())]);
    let t = Template::reference();
    assert_eq!(ids(cost::new_stack(&t, &params("One"))), ids(create_change_set(&["NatPerAz", "HasAllowedClientCidr", "WritesImage"])));
    assert_eq!(ids(cost::new_stack(&t, &params("PerAz"))), ids(create_change_set(&["HasAllowedClientCidr", "WritesImage"])));
    let with_fs = std::collections::BTreeMap::from([("FileSystemId".to_string(), "fs-0123456789abcdef0".to_string())]);
    assert!(!ids(cost::new_stack(&t, &with_fs)).contains("FileSystem"), "a given file system is not created");
}

#[test]
fn a_new_stack_costs_one_nat_gateway_or_one_per_az() {
    let one = cost::estimate(&create_change_set(&["NatPerAz", "HasAllowedClientCidr", "WritesImage"]), &inputs("us-east-1"));
    assert_eq!(item(&one, "NatGatewayA"), [('+', 32.85)]);
    assert_eq!(item(&one, "NatEipA"), [('+', 3.65)]);
    assert!(item(&one, "NatGatewayB").is_empty());
    assert_eq!(item(&one, "ApiVpcEndpoint"), [('+', 14.6)]);
    assert_eq!(item(&one, "LoadBalancer"), [('+', 16.43)]);
    assert_eq!(item(&one, "AutoScalingGroup"), [('+', 13.72), ('+', 1.2)]);
    assert_eq!(one.monthly_usd, 82.45);
    let per_az = cost::estimate(&create_change_set(&["HasAllowedClientCidr", "WritesImage"]), &inputs("us-east-1"));
    assert_eq!(item(&per_az, "NatGatewayB"), [('+', 32.85)]);
    assert_eq!(item(&per_az, "NatEipB"), [('+', 3.65)]);
    assert_eq!(per_az.monthly_usd, 118.95);
    // The JSON `cost` carries the same figures.
    let json = serde_json::to_value(&one).unwrap();
    assert_eq!(json["monthly_usd"], 82.45);
    assert_eq!(json["items"].as_array().unwrap().len(), one.items.len());
    assert_eq!(json["items"][0]["change"], "+");
}

/// `images prune` says what removing the old images' snapshots saves a month, dry run or not.
/// The sizes are DescribeImages' BlockDeviceMappings[].Ebs.VolumeSize (aws-cli
/// examples/ec2/describe-images.rst); EBS snapshots bill $0.05/GB-month at most that size.
#[test]
fn images_prune_says_what_it_saves() {
    let Some(moto) = services::moto() else { return };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let conf = rt.block_on(
        aws_config::defaults(aws_config::BehaviorVersion::latest())
            .endpoint_url(&moto.url)
            .region(aws_config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_cloudformation::config::Credentials::new("testing", "testing", None, None, "tests"))
            .load(),
    );
    let ec2 = aws_sdk_ec2::Client::new(&conf);
    let mut made = Vec::new();
    for _ in 0..2 {
        made.push(rt.block_on(async {
            let ssm = aws_sdk_ssm::Client::new(&conf);
            let base = ssm.get_parameter().name("/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64").send().await.unwrap();
            let run = ec2.run_instances().image_id(base.parameter().unwrap().value().unwrap()).min_count(1).max_count(1).send().await.unwrap();
            let instance = run.instances()[0].instance_id().unwrap().to_string();
            let ami = ec2
                .create_image()
                .instance_id(&instance)
                .name(format!("cost-{}", imgbuild::cmd::run_token()))
                .send()
                .await
                .unwrap()
                .image_id()
                .unwrap()
                .to_string();
            ec2.terminate_instances().instance_ids(&instance).send().await.unwrap();
            ec2.create_tags().resources(&ami).tags(aws_sdk_ec2::types::Tag::builder().key("imgbuild:project").value("costprune").build()).send().await.unwrap();
            ami
        }));
        std::thread::sleep(std::time::Duration::from_millis(1100)); // distinct creation times
    }
    // The size moto reports for the older image, read the way AWS answers it.
    let gib: i64 = rt.block_on(ec2.describe_images().image_ids(&made[0]).send()).unwrap().images()[0]
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs().and_then(|e| e.volume_size()))
        .map(i64::from)
        .sum();
    assert!(gib > 0, "moto reports a volume size");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("imgbuild.yaml"), "name: costprune\nregion: us-east-1\n").unwrap();
    let out = imgbuild(dir.path()).args(["--endpoint-url", &moto.url, "--output", "json", "images", "prune", "--keep", "1", "--dry-run"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let items = doc["cost"]["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{doc}");
    assert_eq!(items[0]["resource"], made[0].as_str());
    assert_eq!(items[0]["change"], "-");
    assert_eq!(items[0]["monthly_usd"].as_f64().unwrap(), -(gib as f64) * 0.05);
    assert_eq!(doc["cost"]["date"], "2026-11-29");
    let text = imgbuild(dir.path()).args(["--endpoint-url", &moto.url, "images", "prune", "--keep", "1", "--dry-run"]).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout).to_string() + &String::from_utf8_lossy(&text.stderr);
    assert!(text.contains(&format!("- {} (AWS::EC2::Image): EBS snapshots of at most {gib} GiB", made[0])), "{text}");
    for ami in &made {
        rt.block_on(ec2.deregister_image().image_id(ami).send()).unwrap();
    }
}
