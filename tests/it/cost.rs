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
use crate::support::{imgbuild, rt};

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
/// priced resource but the alarm mail's is in; moto adds the mail's key ($1) too, which real
/// CloudFormation creates only with `alarms.email`. The pure tests below use the conditions.
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
    assert_eq!(json_items(&doc, "UnhealthyHostsAlarm"), [0.1]);
    assert_eq!(json_items(&doc, "BackupKey"), [1.0]);
    assert_eq!(json_items(&doc, "AlarmTopicKey"), [1.0], "moto lists it without its condition");
    // 118.95 + five alarms + two keys.
    assert_eq!(cost["monthly_usd"], 121.45);
    let item = &cost["items"][0];
    for k in ["change", "resource", "resource_type", "what", "monthly_usd"] {
        assert!(item.get(k).is_some(), "{k} missing from {item}");
    }
    // Said under the diff, before the change set is left for review.
    let at = |s: &str| err.find(s).unwrap_or_else(|| panic!("{s:?} not in {err}"));
    assert!(at("+ ApiVpcEndpoint (AWS::EC2::VPCEndpoint)") < at("monthly cost of this change"));
    assert!(at("net: +$121.45/month") < at("--no-execute: change set"));
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
    assert_eq!(ids(cost::new_stack(&t, &params("One"))), ids(create_change_set(&["NatPerAz", "HasAllowedClientCidr", "AlarmMail", "WritesImage"])));
    assert_eq!(ids(cost::new_stack(&t, &params("PerAz"))), ids(create_change_set(&["HasAllowedClientCidr", "AlarmMail", "WritesImage"])));
    let with_fs = std::collections::BTreeMap::from([("FileSystemId".to_string(), "fs-0123456789abcdef0".to_string())]);
    assert!(!ids(cost::new_stack(&t, &with_fs)).contains("FileSystem"), "a given file system is not created");
}

#[test]
fn a_new_stack_costs_one_nat_gateway_or_one_per_az() {
    // The defaults: one NAT gateway, no allowed client CIDR, no alarm mail.
    let one = cost::estimate(&create_change_set(&["NatPerAz", "HasAllowedClientCidr", "AlarmMail", "WritesImage"]), &inputs("us-east-1"));
    assert_eq!(item(&one, "NatGatewayA"), [('+', 32.85)]);
    assert_eq!(item(&one, "NatEipA"), [('+', 3.65)]);
    assert!(item(&one, "NatGatewayB").is_empty());
    assert_eq!(item(&one, "ApiVpcEndpoint"), [('+', 14.6)]);
    assert_eq!(item(&one, "LoadBalancer"), [('+', 16.43)]);
    assert_eq!(item(&one, "AutoScalingGroup"), [('+', 13.72), ('+', 1.2)]);
    for alarm in ["UnhealthyHostsAlarm", "MemoryAlarm", "DiskAlarm", "EfsBurstCreditAlarm", "EfsIoLimitAlarm"] {
        assert_eq!(item(&one, alarm), [('+', 0.1)], "{alarm}");
    }
    assert_eq!(item(&one, "BackupKey"), [('+', 1.0)], "a customer managed key");
    assert!(item(&one, "AlarmTopicKey").is_empty(), "no alarm mail, no key for it");
    assert_eq!(one.monthly_usd, 83.95);
    let per_az = cost::estimate(&create_change_set(&["HasAllowedClientCidr", "AlarmMail", "WritesImage"]), &inputs("us-east-1"));
    assert_eq!(item(&per_az, "NatGatewayB"), [('+', 32.85)]);
    assert_eq!(item(&per_az, "NatEipB"), [('+', 3.65)]);
    assert_eq!(per_az.monthly_usd, 120.45);
    // With alarms.email: the mail's own key, and a topic that costs nothing by itself.
    let mail = cost::estimate(&create_change_set(&["NatPerAz", "HasAllowedClientCidr", "WritesImage"]), &inputs("us-east-1"));
    assert_eq!((item(&mail, "AlarmTopicKey"), item(&mail, "AlarmTopic")), (vec![('+', 1.0)], vec![('+', 0.0)]));
    assert_eq!(mail.monthly_usd, 84.95);
    // The JSON `cost` carries the same figures.
    let json = serde_json::to_value(&one).unwrap();
    assert_eq!(json["monthly_usd"], 83.95);
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

// ---- Prices from the AWS Price List API (GetProducts) ----
//
// Answers in GetProducts' documented shape: Billing and Cost Management API Reference,
// "GetProducts" (FormatVersion aws_v1; PriceList: an array of strings, each one product's JSON),
// and aws-cli awscli/examples/pricing/get-products.rst (product.productFamily and
// product.attributes with location, usagetype and servicecode; terms.OnDemand.<sku>.<term>
// .priceDimensions.<rate>.unit, beginRange/endRange, pricePerUnit.USD as a ten-decimal string).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_pricing::operation::get_products::{GetProductsError, GetProductsInput, GetProductsOutput};
use aws_smithy_mocks::{Rule, mock};
use imgbuild::cost::pricelist::{self, Product};
use imgbuild::cost::{Book, products};

/// One PriceList entry as the example prints it (only the fields read; the rest as documented).
pub(crate) fn entry(sku: &str, family: &str, usagetype: &str, location: &str, unit: &str, usd: &str) -> String {
    serde_json::json!({
        "product": {
            "productFamily": family,
            "attributes": { "usagetype": usagetype, "locationType": "AWS Region", "location": location, "operation": "" },
            "sku": sku
        },
        "serviceCode": "AmazonEC2",
        "terms": { "OnDemand": { format!("{sku}.JRTCKXETXF"): {
            "priceDimensions": { format!("{sku}.JRTCKXETXF.6YS6EN2CT7"): {
                "unit": unit, "endRange": "Inf", "description": format!("${usd} per {unit}"), "appliesTo": [],
                "rateCode": format!("{sku}.JRTCKXETXF.6YS6EN2CT7"), "beginRange": "0", "pricePerUnit": { "USD": usd }
            }},
            "sku": sku, "effectiveDate": "2026-11-01T00:00:00Z", "offerTermCode": "JRTCKXETXF", "termAttributes": {}
        }}},
        "version": "20261101000000",
        "publicationDate": "2026-11-01T00:00:00Z"
    })
    .to_string()
}

type Requests = Arc<Mutex<Vec<GetProductsInput>>>;

fn filters(r: &GetProductsInput) -> Vec<(String, String)> {
    r.filters().iter().map(|f| (f.field().to_string(), f.value().to_string())).collect()
}

fn pricing(rules: &[Rule]) -> aws_sdk_pricing::Client {
    mocked!(aws_sdk_pricing, rules, aws_smithy_types::retry::RetryConfig::disabled())
}

/// Answers each product the diff of a new stack with an alarm asks about, with prices other than
/// the table's so the test sees whose figures are used; EFS gets no product. A NAT gateway's
/// family also holds its per-GB product, an NLB's its LCU-hour, the alarms the high-resolution
/// one: none of them may be taken.
pub(crate) fn answer_for(r: &GetProductsInput) -> GetProductsOutput {
    let f = filters(r);
    let has = |k: &str, v: &str| f.iter().any(|(a, b)| a == k && b == v);
    let loc = "US East (N. Virginia)";
    let list: Vec<String> = if has("productFamily", "NAT Gateway") {
        vec![
            entry("NATH", "NAT Gateway", "NatGateway-Hours", loc, "Hrs", "0.0500000000"),
            entry("NATB", "NAT Gateway", "NatGateway-Bytes", loc, "GB", "0.0450000000"),
        ]
    } else if has("productFamily", "Compute Instance") {
        vec![entry("T3AS", "Compute Instance", "BoxUsage:t3a.small", loc, "Hrs", "0.0200000000")]
    } else if has("productFamily", "VpcEndpoint") {
        vec![entry("VPCE", "VpcEndpoint", "VpcEndpoint-Hours", loc, "Hrs", "0.0110000000")]
    } else if has("productFamily", "Load Balancer-Network") {
        vec![
            entry("NLBH", "Load Balancer-Network", "LoadBalancerUsage", loc, "Hrs", "0.0250000000"),
            entry("NLCU", "Load Balancer-Network", "LCUUsage", loc, "LCU-Hrs", "0.0060000000"),
        ]
    } else if has("productFamily", "Storage") && has("volumeApiName", "gp3") {
        vec![entry("GP3S", "Storage", "EBS:VolumeUsage.gp3", loc, "GB-Mo", "0.0800000000")]
    } else if has("productFamily", "Alarm") {
        vec![
            entry("ALRM", "Alarm", "CW:AlarmMonitorUsage", loc, "Alarms", "0.1000000000"),
            entry("HRAL", "Alarm", "CW:HighResAlarmMonitorUsage", loc, "Alarms", "0.3000000000"),
        ]
    } else {
        vec![]
    };
    GetProductsOutput::builder().format_version("aws_v1").set_price_list(Some(list)).build()
}

fn scripted(seen: Requests) -> Rule {
    mock!(aws_sdk_pricing::Client::get_products)
        .match_requests(move |r| {
            seen.lock().unwrap().push(r.clone());
            true
        })
        .then_output(|| GetProductsOutput::builder().build())
}

/// A change set adding what a new stack with one NAT gateway and the alarm mail prices.
fn new_stack_changes() -> Vec<Change> {
    create_change_set(&["NatPerAz", "HasAllowedClientCidr", "WritesImage"])
}

#[test]
fn the_price_list_is_asked_with_exact_filters_for_exactly_the_products_the_diff_prices() {
    let changes = new_stack_changes();
    let want = products(&changes, &inputs("us-east-1"));
    assert_eq!(
        want,
        BTreeSet::from([
            Product::Instance("t3a.small".into()),
            Product::NatGatewayHour,
            Product::InterfaceEndpointHour,
            Product::NlbHour,
            Product::EfsStandardGbMonth,
            Product::Gp3GbMonth,
            Product::AlarmMonth,
        ])
    );
    let seen: Requests = Arc::default();
    let seen2 = seen.clone();
    let rule = mock!(aws_sdk_pricing::Client::get_products)
        .match_requests(move |r| {
            seen2.lock().unwrap().push(r.clone());
            true
        })
        .then_compute_output(answer_for);
    let client = pricing(&[rule]);
    let book = rt().block_on(pricelist::fetch(&client, "us-east-1", &want, Duration::from_secs(5)));
    let sent = seen.lock().unwrap().clone();
    assert_eq!(sent.len(), want.len(), "one question a product");
    let tm = |k: &str, v: &str| (k.to_string(), v.to_string());
    let instance = sent.iter().find(|r| r.service_code() == Some("AmazonEC2") && filters(r).contains(&tm("productFamily", "Compute Instance"))).unwrap();
    assert_eq!(
        filters(instance),
        [
            tm("productFamily", "Compute Instance"),
            tm("location", "US East (N. Virginia)"),
            tm("instanceType", "t3a.small"),
            tm("operatingSystem", "Linux"),
            tm("tenancy", "Shared"),
            tm("preInstalledSw", "NA"),
            tm("licenseModel", "No License required"),
            tm("capacitystatus", "Used"),
        ]
    );
    for r in &sent {
        assert!(r.filters().iter().all(|f| f.r#type() == &aws_sdk_pricing::types::FilterType::TermMatch));
        assert_eq!(r.format_version(), Some("aws_v1"));
    }
    let services: BTreeSet<(String, Vec<(String, String)>)> = sent.iter().map(|r| (r.service_code().unwrap().to_string(), filters(r))).collect();
    let loc = tm("location", "US East (N. Virginia)");
    for (svc, family, extra) in [
        ("AmazonEC2", "NAT Gateway", None),
        ("AmazonVPC", "VpcEndpoint", None),
        ("AWSELB", "Load Balancer-Network", None),
        ("AmazonEFS", "Storage", Some(tm("storageClass", "General Purpose"))),
        ("AmazonEC2", "Storage", Some(tm("volumeApiName", "gp3"))),
        ("AmazonCloudWatch", "Alarm", None),
    ] {
        let mut f = vec![tm("productFamily", family), loc.clone()];
        f.extend(extra);
        assert!(services.contains(&(svc.to_string(), f.clone())), "{svc} {f:?} not asked: {services:?}");
    }

    // EFS had no product in the answer: its price (and only it) comes from the table, said once.
    assert_eq!(book.live.get(&Product::NatGatewayHour), Some(&50_000), "the hourly product, not the per-GB one");
    assert_eq!(book.live.get(&Product::NlbHour), Some(&25_000), "the hour, not the LCU-hour");
    assert_eq!(book.live.get(&Product::AlarmMonth), Some(&100_000), "the standard alarm, not the high-resolution one");
    assert!(!book.live.contains_key(&Product::EfsStandardGbMonth));
    let fallback = book.fallback.clone().unwrap();
    assert!(
        fallback.contains("1 of 7 prices from the price table dated 2026-11-29") && fallback.contains("EFS Standard GB-month: no product matched"),
        "{fallback}"
    );

    let e = cost::estimate_with(&changes, &inputs("us-east-1"), &book);
    assert_eq!(item(&e, "NatGatewayA"), [('+', 36.5)], "$0.05 x 730 from the API, not the table's $32.85");
    assert_eq!(item(&e, "AutoScalingGroup"), [('+', 14.6), ('+', 1.2)]);
    assert_eq!(item(&e, "UnhealthyHostsAlarm"), [('+', 0.1)]);
    assert_eq!(item(&e, "AlarmTopic"), [('+', 0.0)]);
    let nat = e.items.iter().find(|i| i.resource == "NatGatewayA").unwrap();
    assert!(nat.source.starts_with("AWS Price List API, 20"), "{}", nat.source);
    let eip = e.items.iter().find(|i| i.resource == "NatEipA").unwrap();
    assert_eq!(eip.source, "price table dated 2026-11-29");
    let text = cost::lines(&e).join("\n");
    assert!(text.contains("prices: AWS Price List API, 20") && text.contains("price table dated 2026-11-29 where the API gave none"), "{text}");
    assert!(text.contains("NatGatewayA (AWS::EC2::NatGateway): NAT gateway  +$36.50  [AWS Price List API, 20"), "{text}");
    assert_eq!(text.matches("note: 1 of 7 prices from the price table").count(), 1, "{text}");
    let json = serde_json::to_value(&e).unwrap();
    assert!(json["items"][0]["source"].is_string() && json["fallback"].is_string(), "{json}");
}

/// AccessDeniedException is how GetProducts refuses a caller without pricing:GetProducts (API
/// Reference, GetProducts, Errors): every price comes from the table, and the estimate says why
/// once.
#[test]
fn access_denied_falls_back_to_the_table_and_says_so_once() {
    let rule = mock!(aws_sdk_pricing::Client::get_products).then_error(|| {
        let msg = "User: arn:aws:iam::123456789012:user/dev is not authorized to perform: pricing:GetProducts";
        GetProductsError::AccessDeniedException(
            aws_sdk_pricing::types::error::AccessDeniedException::builder()
                .message(msg)
                .meta(aws_smithy_types::error::ErrorMetadata::builder().code("AccessDeniedException").message(msg).build())
                .build(),
        )
    });
    let client = pricing(&[rule]);
    let changes = new_stack_changes();
    let i = inputs("us-east-1");
    let book = rt().block_on(cost::book(&client, imgbuild::config::PriceSource::Auto, "us-east-1", &products(&changes, &i)));
    assert!(book.live.is_empty());
    let e = cost::estimate_with(&changes, &i, &book);
    assert_eq!(e.monthly_usd, 84.95, "the table's $82.45, five $0.10 alarms and two $1 keys");
    assert_eq!(e.source, "price table dated 2026-11-29");
    assert!(e.items.iter().all(|i| i.source == "price table dated 2026-11-29"));
    let text = cost::lines(&e).join("\n");
    assert_eq!(text.matches("note:").count(), 1, "{text}");
    assert!(text.contains("every price from the price table dated 2026-11-29") && text.contains("AccessDeniedException"), "{text}");
}

/// A Price List that does not answer (a firewall that swallows the connection) must not hold up
/// deploy: the lookup gives up at its bound and the table prices everything.
#[test]
fn a_price_list_that_does_not_answer_is_given_up_on_in_time() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let client = aws_sdk_pricing::Client::from_conf(
        aws_sdk_pricing::config::Builder::new()
            .behavior_version(aws_sdk_pricing::config::BehaviorVersion::latest())
            .region(aws_sdk_pricing::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_pricing::config::Credentials::new("testing", "testing", None, None, "tests"))
            .endpoint_url(url)
            .build(),
    );
    let started = std::time::Instant::now();
    let wanted = BTreeSet::from([Product::NatGatewayHour, Product::NlbHour]);
    let book = rt().block_on(pricelist::fetch(&client, "us-east-1", &wanted, Duration::from_millis(400)));
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    assert!(book.live.is_empty());
    let f = book.fallback.unwrap();
    assert!(f.contains("not answering in time") && f.contains("no answer within"), "{f}");
    drop(listener);
}

/// `prices: table` (or `--prices table`) asks nothing.
#[test]
fn the_table_choice_makes_no_call() {
    let seen: Requests = Arc::default();
    let client = pricing(&[scripted(seen.clone())]);
    let changes = new_stack_changes();
    let i = inputs("us-east-1");
    let book = rt().block_on(cost::book(&client, imgbuild::config::PriceSource::Table, "us-east-1", &products(&changes, &i)));
    assert!(seen.lock().unwrap().is_empty(), "no GetProducts call");
    assert_eq!(book, Book::table());
    assert_eq!(cost::estimate_with(&changes, &i, &book).source, "price table dated 2026-11-29");
    // And the same choice from the command line parses, with the config's as the default.
    use clap::Parser;
    let cli = imgbuild::cli::Cli::try_parse_from(["imgbuild", "--prices", "table", "deploy"]).unwrap();
    assert_eq!(cli.global.prices, Some(imgbuild::config::PriceSource::Table));
    assert!(imgbuild::cli::Cli::try_parse_from(["imgbuild", "--prices", "live", "deploy"]).is_err());
}

/// Two different prices for one question (a filter too loose) are no answer: the table's is used.
#[test]
fn an_ambiguous_answer_is_no_answer() {
    let q = Product::NatGatewayHour.query("US East (N. Virginia)");
    let loc = "US East (N. Virginia)";
    let two = [entry("A", "NAT Gateway", "NatGateway-Hours", loc, "Hrs", "0.045"), entry("B", "NAT Gateway", "USE1-NatGateway-Hours", loc, "Hrs", "0.050")];
    assert!(pricelist::price_of(&two, &q).unwrap_err().contains("2 different prices"));
    assert!(pricelist::price_of(&[], &q).unwrap_err().contains("no product matched"));
    // Another region's prefix on the usage type still matches; another usage type does not.
    let ohio = [entry("C", "NAT Gateway", "USE2-NatGateway-Hours", "US East (Ohio)", "Hrs", "0.0450000000")];
    assert_eq!(pricelist::price_of(&ohio, &q), Ok(45_000));
    assert_eq!(pricelist::micro("0.0188000000"), Some(18_800));
    assert_eq!(pricelist::micro("0.00000045"), Some(0));
    assert_eq!(pricelist::micro("0.0000005"), Some(1));
    assert_eq!(pricelist::micro("12"), Some(12_000_000));
    assert_eq!(pricelist::micro("1e-3"), None);
    assert_eq!(pricelist::location("eu-west-1"), Some("EU (Ireland)"));
}

/// bake's snapshots at the Price List's GB-month when it answered, said as such.
#[test]
fn snapshots_are_priced_from_the_book_when_it_has_them() {
    let mut book = Book { asked_at: Some("2026-11-29T15:40:12Z".into()), ..Book::default() };
    book.live.insert(Product::SnapshotGbMonth, 60_000);
    let e = cost::snapshots_with("us-east-1", &[("ami-0new".into(), 15)], &[], &book);
    assert_eq!(item(&e, "ami-0new"), [('+', 0.9)], "15 GiB x $0.06, not the table's $0.05");
    assert_eq!(e.items[0].source, "AWS Price List API, 2026-11-29T15:40:12Z");
    assert_eq!(e.source, "AWS Price List API, 2026-11-29T15:40:12Z");
    // A region outside the table is still priced from what the API answered.
    let e = cost::snapshots_with("ap-southeast-2", &[("ami-0new".into(), 10)], &[], &book);
    assert_eq!(item(&e, "ami-0new"), [('+', 0.6)]);
    assert!(e.unpriced.is_empty(), "{:?}", e.unpriced);
}
