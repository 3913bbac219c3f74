//! The monthly cost of what a change set adds and removes, at the prices of a [`Book`]: the AWS
//! Price List API's where it answered ([`pricelist`], asked by the caller for exactly the
//! products [`products`] names), else the dated table in [`prices`]. The estimate itself is pure:
//! the change set's resource changes, the template, the parameters, the sizes and the prices
//! looked up by the caller go in; line items, each with the source of its price, come out. Only the fixed, always-on charges
//! are priced (hours, storage at its current size); traffic-based ones (NAT and endpoint data
//! processing, NLCUs, API Gateway requests) depend on use and are said to be left out.

pub mod pricelist;
pub mod prices;

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_yaml::Value;

use crate::stack::Change;
use crate::stack::template::Template;

pub use pricelist::{Book, Product};
pub use prices::Prices;

use crate::config::PriceSource;

/// The prices for `products`: the Price List API's (bounded by [`pricelist::LOOKUP_LIMIT`]) with
/// `auto`, none with `table`, which makes no call.
pub async fn book(pricing: &aws_sdk_pricing::Client, source: PriceSource, region: &str, products: &BTreeSet<Product>) -> Book {
    match source {
        PriceSource::Table => Book::table(),
        PriceSource::Auto => pricelist::fetch(pricing, region, products, pricelist::LOOKUP_LIMIT).await,
    }
}

const GIB: i128 = 1 << 30;

/// What the change set's resources are sized by, read from the template and the deploy.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub region: String,
    /// The InstanceType this deploy sets, and the one the stack runs now (an update).
    pub instance_type: String,
    pub previous_instance_type: Option<String>,
    /// Interface endpoints: logical id -> the AZs (subnets) it has a network interface in.
    pub endpoint_azs: BTreeMap<String, i64>,
    /// Auto Scaling groups: logical id -> desired capacity.
    pub asg_capacity: BTreeMap<String, i64>,
    /// The launch template's root volume, GiB of gp3, per instance.
    pub root_volume_gb: i64,
    /// The stack's file system as it stands (DescribeFileSystems SizeInBytes.Value), if any.
    pub efs_bytes: Option<u64>,
    /// What the caller could not size (a failed lookup), said with the estimate.
    pub notes: Vec<String>,
}

impl Inputs {
    /// Sizes from the template itself, so the estimate follows the template deployed.
    pub fn from_template(template: &Template, region: &str, instance_type: &str) -> Self {
        let resources = template.document().get("Resources").and_then(Value::as_mapping).cloned().unwrap_or_default();
        let mut inputs = Inputs { region: region.to_string(), instance_type: instance_type.to_string(), ..Default::default() };
        for (id, r) in &resources {
            let Some(id) = id.as_str() else { continue };
            let props = r.get("Properties");
            match r.get("Type").and_then(Value::as_str) {
                Some("AWS::EC2::VPCEndpoint") if props.and_then(|p| p.get("VpcEndpointType")).and_then(Value::as_str) == Some("Interface") => {
                    let n = props.and_then(|p| p.get("SubnetIds")).and_then(Value::as_sequence).map_or(1, |s| s.len() as i64);
                    inputs.endpoint_azs.insert(id.to_string(), n);
                }
                Some("AWS::AutoScaling::AutoScalingGroup") => {
                    let n = props.and_then(|p| p.get("DesiredCapacity").or_else(|| p.get("MinSize"))).and_then(number).unwrap_or(1);
                    inputs.asg_capacity.insert(id.to_string(), n);
                }
                Some("AWS::EC2::LaunchTemplate") => {
                    let disks = props.and_then(|p| p.get("LaunchTemplateData")).and_then(|d| d.get("BlockDeviceMappings")).and_then(Value::as_sequence);
                    inputs.root_volume_gb +=
                        disks.into_iter().flatten().filter_map(|m| m.get("Ebs").and_then(|e| e.get("VolumeSize")).and_then(number)).sum::<i64>();
                }
                _ => {}
            }
        }
        inputs
    }
}

/// The resources a new stack of `template` gets with these parameters, as the additions of its
/// CREATE change set: CloudFormation creates a resource only when its Condition holds. A
/// condition this cannot evaluate keeps its resources in (an estimate errs towards cost).
pub fn new_stack(template: &Template, parameters: &BTreeMap<String, String>) -> Vec<Change> {
    let doc = template.document();
    let mut params: BTreeMap<String, String> = doc
        .get("Parameters")
        .and_then(Value::as_mapping)
        .map(|m| m.iter().filter_map(|(k, v)| Some((k.as_str()?.to_string(), scalar(v.get("Default")?)?))).collect())
        .unwrap_or_default();
    params.extend(parameters.iter().map(|(k, v)| (k.clone(), v.clone())));
    let conditions = doc.get("Conditions").and_then(Value::as_mapping).cloned().unwrap_or_default();
    let holds = |name: &str| conditions.get(name).and_then(|c| condition(c, &params, &conditions, 0)).unwrap_or(true);
    doc.get("Resources")
        .and_then(Value::as_mapping)
        .into_iter()
        .flatten()
        .filter(|(_, r)| r.get("Condition").and_then(Value::as_str).is_none_or(holds))
        .filter_map(|(id, r)| {
            Some(Change { action: '+', logical_id: id.as_str()?.to_string(), resource_type: r.get("Type")?.as_str()?.to_string(), replacement: None })
        })
        .collect()
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// An intrinsic condition (short `!Equals` or long `Fn::Equals` form) over parameter values.
fn condition(v: &Value, params: &BTreeMap<String, String>, all: &serde_yaml::Mapping, depth: u8) -> Option<bool> {
    if depth > 16 {
        return None;
    }
    let (name, arg) = match v {
        Value::Tagged(t) => (t.tag.to_string().trim_start_matches('!').to_string(), &t.value),
        Value::Mapping(m) if m.len() == 1 => {
            let (k, a) = m.iter().next()?;
            (k.as_str()?.trim_start_matches("Fn::").to_string(), a)
        }
        _ => return None,
    };
    let list = || arg.as_sequence().cloned().unwrap_or_default();
    match name.as_str() {
        "Equals" => {
            let l = list();
            Some(operand(l.first()?, params)? == operand(l.get(1)?, params)?)
        }
        "Not" => condition(list().first()?, params, all, depth + 1).map(|b| !b),
        "And" => list().iter().map(|c| condition(c, params, all, depth + 1)).collect::<Option<Vec<_>>>().map(|v| v.iter().all(|b| *b)),
        "Or" => list().iter().map(|c| condition(c, params, all, depth + 1)).collect::<Option<Vec<_>>>().map(|v| v.iter().any(|b| *b)),
        "Condition" => condition(all.get(arg.as_str()?)?, params, all, depth + 1),
        _ => None,
    }
}

fn operand(v: &Value, params: &BTreeMap<String, String>) -> Option<String> {
    match v {
        Value::Tagged(t) if t.tag == "!Ref" => params.get(t.value.as_str()?).cloned(),
        Value::Mapping(m) if m.len() == 1 => params.get(m.get("Ref")?.as_str()?).cloned(),
        other => scalar(other),
    }
}

fn number(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// One line of the estimate: what a change adds (positive) or removes (negative) a month.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Item {
    pub change: char,
    pub resource: String,
    pub resource_type: String,
    pub what: String,
    pub monthly_usd: f64,
    /// Where this figure's price comes from: "AWS Price List API, <time>" or "price table dated <date>".
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EfsStorage {
    pub size_bytes: u64,
    pub monthly_usd: f64,
    pub source: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Estimate {
    pub region: String,
    pub currency: &'static str,
    /// Where the prices come from, and their date or time.
    pub source: String,
    /// Why prices came from the table although the Price List API was asked (said once).
    pub fallback: Option<String>,
    pub date: &'static str,
    pub items: Vec<Item>,
    /// The net monthly change of the priced items.
    pub monthly_usd: f64,
    /// The stack's file system at its current size, a month; unchanged by the change set unless
    /// an item says so.
    pub efs_storage: Option<EfsStorage>,
    /// What was not priced, and why.
    pub unpriced: Vec<String>,
    pub excludes: &'static str,
}

fn table_source() -> String {
    format!("price table dated {}", prices::DATE)
}

fn api_source(at: &str) -> String {
    format!("AWS Price List API, {at}")
}
const EXCLUDES: &str = "usage-based charges (NAT and endpoint data processing, NLB capacity units, API Gateway requests, data transfer) and taxes";

fn usd(micro: i64) -> f64 {
    // Rounded to the cent through integers, so the figures are exact in JSON.
    let cents = if micro >= 0 { (micro + 5_000) / 10_000 } else { (micro - 5_000) / 10_000 };
    cents as f64 / 100.0
}

struct Builder<'a> {
    items: Vec<(Item, i64)>,
    unpriced: Vec<String>,
    table: Option<&'static Prices>,
    book: &'a Book,
    /// Every product a price was looked up for: what the Price List is asked about.
    asked: BTreeSet<Product>,
}

impl Builder<'_> {
    /// The price of a product and where it comes from: the Price List's answer, else the table.
    fn rate(&mut self, p: Product) -> Option<(i64, String)> {
        self.asked.insert(p.clone());
        if let (Some(m), Some(at)) = (self.book.live.get(&p), &self.book.asked_at) {
            return Some((*m, api_source(at)));
        }
        let t = self.table?;
        let m = match &p {
            Product::Instance(kind) => t.instance_hour(kind)?,
            Product::NatGatewayHour => t.nat_gateway_hour,
            Product::InterfaceEndpointHour => t.interface_endpoint_az_hour,
            Product::NlbHour => t.nlb_hour,
            Product::EfsStandardGbMonth => t.efs_standard_gb_month,
            Product::SnapshotGbMonth => t.snapshot_gb_month,
            Product::Gp3GbMonth => t.gp3_gb_month,
            Product::AlarmMonth => t.cloudwatch_alarm_month,
        };
        Some((m, table_source()))
    }

    fn push(&mut self, sign: i64, c: &Change, what: String, micro: i64, source: String) {
        let micro = sign * micro;
        self.items.push((
            Item { change: c.action, resource: c.logical_id.clone(), resource_type: c.resource_type.clone(), what, monthly_usd: usd(micro), source },
            micro,
        ));
    }

    /// Prices `units` of a product, or says it could not.
    fn priced(&mut self, sign: i64, c: &Change, p: Product, what: String, units: i64) {
        match self.rate(p.clone()) {
            Some((m, source)) => self.push(sign, c, what, units * m, source),
            None => self.unpriced.push(format!(
                "{what} ({}): no price for it in the price table dated {}, and none from the AWS Price List API",
                c.logical_id,
                prices::DATE
            )),
        }
    }

    fn finish(self, region: &str, efs_storage: Option<EfsStorage>) -> Estimate {
        let net = self.items.iter().map(|(_, m)| *m).sum();
        let sources: Vec<&str> = self.items.iter().map(|(i, _)| i.source.as_str()).chain(efs_storage.iter().map(|e| e.source.as_str())).collect();
        let live = sources.iter().any(|s| s.starts_with("AWS Price List"));
        let table = sources.iter().any(|s| !s.starts_with("AWS Price List"));
        let source = match (&self.book.asked_at, live, table) {
            (Some(at), true, true) => format!("{}; {} where the API gave none", api_source(at), table_source()),
            (Some(at), true, false) => api_source(at),
            (Some(at), false, false) if self.book.fallback.is_none() => api_source(at),
            _ => table_source(),
        };
        Estimate {
            region: region.to_string(),
            currency: "USD",
            source,
            fallback: self.book.fallback.clone(),
            date: prices::DATE,
            items: self.items.into_iter().map(|(i, _)| i).collect(),
            monthly_usd: usd(net),
            efs_storage,
            unpriced: self.unpriced,
            excludes: EXCLUDES,
        }
    }
}

/// The monthly cost of a change set's additions and removals at the table's prices (modifications
/// that keep a resource cost what they cost; an instance type change is priced as the old out,
/// the new in).
pub fn estimate(changes: &[Change], inputs: &Inputs) -> Estimate {
    estimate_with(changes, inputs, &Book::table())
}

/// The same at the prices of `book`, the table filling in what it lacks.
pub fn estimate_with(changes: &[Change], inputs: &Inputs, book: &Book) -> Estimate {
    build(changes, inputs, book).0
}

/// The products an estimate of these changes prices: what to ask the Price List for.
pub fn products(changes: &[Change], inputs: &Inputs) -> BTreeSet<Product> {
    // Walked over a table that exists, so a region outside the table is asked about too.
    build(changes, &Inputs { region: prices::TABLE[0].region.into(), ..inputs.clone() }, &Book::table()).1
}

fn build(changes: &[Change], inputs: &Inputs, book: &Book) -> (Estimate, BTreeSet<Product>) {
    let table = prices::for_region(&inputs.region);
    let mut b = Builder { items: Vec::new(), unpriced: inputs.notes.clone(), table, book, asked: BTreeSet::new() };
    if table.is_none() && book.live.is_empty() {
        b.unpriced.push(format!(
            "region {} is not in the price table of {} (it has {}): no figures",
            if inputs.region.is_empty() { "(none)" } else { &inputs.region },
            prices::DATE,
            prices::TABLE.iter().map(|p| p.region).collect::<Vec<_>>().join(", ")
        ));
        return (b.finish(&inputs.region, None), BTreeSet::new());
    }
    let month = prices::HOURS_PER_MONTH;
    let asg_touched = changes.iter().any(|c| c.resource_type == "AWS::AutoScaling::AutoScalingGroup" && matches!(c.action, '+' | '-'));
    for c in changes {
        let sign = match c.action {
            '+' => 1,
            '-' => -1,
            '~' if !asg_touched && c.resource_type == "AWS::AutoScaling::AutoScalingGroup" => {
                instance_type_change(&mut b, c, inputs);
                continue;
            }
            _ => continue,
        };
        match c.resource_type.as_str() {
            "AWS::EC2::NatGateway" => b.priced(sign, c, Product::NatGatewayHour, "NAT gateway".into(), month),
            // Not a Price List product here: always the table's.
            "AWS::EC2::EIP" => match b.table {
                Some(t) => b.push(sign, c, "public IPv4 address".into(), t.public_ipv4_hour * month, table_source()),
                None => b.unpriced.push(format!("public IPv4 address ({}): region {} is not in the price table", c.logical_id, inputs.region)),
            },
            "AWS::EC2::VPCEndpoint" => {
                if let Some(azs) = inputs.endpoint_azs.get(&c.logical_id) {
                    let what = format!("interface endpoint in {azs} AZ{}", if *azs == 1 { "" } else { "s" });
                    b.priced(sign, c, Product::InterfaceEndpointHour, what, azs * month);
                }
            }
            "AWS::ElasticLoadBalancingV2::LoadBalancer" => b.priced(sign, c, Product::NlbHour, "load balancer (hourly)".into(), month),
            "AWS::AutoScaling::AutoScalingGroup" => {
                let n = inputs.asg_capacity.get(&c.logical_id).copied().unwrap_or(1);
                // A removal takes away what runs now, an addition brings what this deploy sets.
                let kind = if sign < 0 { inputs.previous_instance_type.as_deref().unwrap_or(&inputs.instance_type) } else { &inputs.instance_type };
                match b.rate(Product::Instance(kind.to_string())) {
                    Some((h, source)) => b.push(sign, c, format!("{n} x {kind} instance"), n * h * month, source),
                    None => b.unpriced.push(format!("instance type {kind} ({}) is not in the price table for {}", c.logical_id, inputs.region)),
                }
                if inputs.root_volume_gb > 0 {
                    b.priced(sign, c, Product::Gp3GbMonth, format!("{n} x {} GiB gp3 root volume", inputs.root_volume_gb), n * inputs.root_volume_gb);
                }
            }
            "AWS::EFS::FileSystem" if sign > 0 => match b.rate(Product::EfsStandardGbMonth) {
                Some((gb, source)) => b.push(sign, c, format!("EFS Standard storage, empty at first (${:.2}/GB-month as it fills)", usd(gb)), 0, source),
                None => b.push(sign, c, "EFS Standard storage, empty at first".into(), 0, table_source()),
            },
            // The template retains the file system (DeletionPolicy Retain): leaving the stack
            // does not end its bill.
            "AWS::EFS::FileSystem" => b.push(sign, c, "file system retained (DeletionPolicy: Retain): its storage is still billed".into(), 0, table_source()),
            // A standard-resolution metric alarm is billed per alarm-month (Amazon CloudWatch
            // pricing: $0.10 per alarm metric a month).
            "AWS::CloudWatch::Alarm" => b.priced(sign, c, Product::AlarmMonth, "CloudWatch alarm (standard resolution)".into(), 1),
            // A customer managed key bills a month while it exists; the template's keys are for
            // the backups and the alarm mail. Not a Price List product here: the table's.
            "AWS::KMS::Key" => match b.table {
                Some(t) => b.push(sign, c, "KMS customer managed key".into(), t.kms_key_month, table_source()),
                None => b.unpriced.push(format!("KMS key ({}): region {} is not in the price table", c.logical_id, inputs.region)),
            },
            // A topic costs nothing by itself; its requests and deliveries are usage.
            "AWS::SNS::Topic" => b.push(sign, c, "SNS topic (free; billed per request and delivery)".into(), 0, table_source()),
            _ => {}
        }
    }
    let efs = inputs.efs_bytes.and_then(|bytes| {
        let (gb, source) = b.rate(Product::EfsStandardGbMonth)?;
        Some(EfsStorage { size_bytes: bytes, monthly_usd: usd((bytes as i128 * gb as i128 / GIB) as i64), source })
    });
    let asked = std::mem::take(&mut b.asked);
    (b.finish(&inputs.region, efs), asked)
}

/// The monthly cost of AMI snapshots: images added (a bake) and removed (`images prune`), each
/// as (image id, GiB of the volumes snapshotted). EBS snapshots bill the blocks they store, at
/// most the volume's size, so the figures are an upper bound and said so.
pub fn snapshots(region: &str, added: &[(String, i64)], removed: &[(String, i64)]) -> Estimate {
    snapshots_with(region, added, removed, &Book::table())
}

/// The same at the prices of `book` (the one product: [`Product::SnapshotGbMonth`]).
pub fn snapshots_with(region: &str, added: &[(String, i64)], removed: &[(String, i64)], book: &Book) -> Estimate {
    let table = prices::for_region(region);
    let mut b = Builder { items: Vec::new(), unpriced: Vec::new(), table, book, asked: BTreeSet::new() };
    if table.is_none() && book.live.is_empty() {
        b.unpriced.push(format!("region {region} is not in the price table of {}: no figures", prices::DATE));
        return b.finish(region, None);
    }
    for (action, sign, list) in [('+', 1, added), ('-', -1, removed)] {
        for (ami, gib) in list {
            let c = Change { action, logical_id: ami.clone(), resource_type: "AWS::EC2::Image".into(), replacement: None };
            b.priced(sign, &c, Product::SnapshotGbMonth, format!("EBS snapshots of at most {gib} GiB"), *gib);
        }
    }
    b.finish(region, None)
}

/// GiB of every EBS volume an automation document or template maps (`BlockDeviceMappings[].Ebs
/// .VolumeSize`), wherever it sits: what an image baked from it snapshots at most.
pub fn volume_gib(yaml: &str) -> i64 {
    fn walk(v: &Value) -> i64 {
        match v {
            Value::Mapping(m) => m
                .iter()
                .map(|(k, v)| match (k.as_str(), v) {
                    (Some("BlockDeviceMappings"), Value::Sequence(s)) => {
                        s.iter().filter_map(|d| d.get("Ebs").and_then(|e| e.get("VolumeSize")).and_then(number)).sum()
                    }
                    _ => walk(v),
                })
                .sum(),
            Value::Sequence(s) => s.iter().map(walk).sum(),
            _ => 0,
        }
    }
    serde_yaml::from_str::<Value>(yaml).map(|v| walk(&v)).unwrap_or(0)
}

fn instance_type_change(b: &mut Builder, c: &Change, inputs: &Inputs) {
    let Some(old) = inputs.previous_instance_type.as_deref().filter(|o| *o != inputs.instance_type) else { return };
    let n = inputs.asg_capacity.get(&c.logical_id).copied().unwrap_or(1);
    match (b.rate(Product::Instance(old.to_string())), b.rate(Product::Instance(inputs.instance_type.clone()))) {
        (Some((o, os)), Some((new, ns))) => {
            let month = prices::HOURS_PER_MONTH;
            b.push(-1, c, format!("{n} x {old} instance (replaced)"), n * o * month, os);
            b.push(1, c, format!("{n} x {} instance", inputs.instance_type), n * new * month, ns);
        }
        _ => b.unpriced.push(format!("instance type change {old} -> {} ({}): not both priced for {}", inputs.instance_type, c.logical_id, inputs.region)),
    }
}

fn size(bytes: u64) -> String {
    if bytes >= 1 << 30 { format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64) } else { format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64) }
}

fn money(v: f64) -> String {
    if v < 0.0 { format!("-${:.2}", -v) } else { format!("+${v:.2}") }
}

/// The estimate as the lines printed under the change set.
pub fn lines(e: &Estimate) -> Vec<String> {
    let mut out = vec![format!("monthly cost of this change ({}, {}, prices: {}):", e.region, e.currency, e.source)];
    // One source says itself in the heading; with two, each figure says which it is.
    let mixed = e.items.iter().any(|i| i.source != e.items[0].source);
    for i in &e.items {
        let tag = if mixed { format!("  [{}]", i.source) } else { String::new() };
        out.push(format!("  {} {} ({}): {}  {}{tag}", i.change, i.resource, i.resource_type, i.what, money(i.monthly_usd)));
    }
    if let Some(f) = &e.fallback {
        out.push(format!("  note: {f}"));
    }
    if let Some(s) = &e.efs_storage {
        out.push(format!("  the stack's file system holds {}: ${:.2}/month of EFS Standard storage", size(s.size_bytes), s.monthly_usd));
    }
    for u in &e.unpriced {
        out.push(format!("  not priced: {u}"));
    }
    out.push(format!("  net: {}/month; not included: {}", money(e.monthly_usd), e.excludes));
    out
}
