//! Live prices from the AWS Price List Query API (`GetProducts`), for exactly the products an
//! estimate prices. Advisory and bounded: the whole lookup gets [`LOOKUP_LIMIT`], and any price it
//! does not settle (AccessDeniedException, no network, no product, more than one price) is taken
//! from the dated table instead, which the estimate says once. Nothing is cached between runs:
//! a deploy asks at most a handful of questions, and a stale cache would be a second table.
//!
//! Request and answer shapes: Billing and Cost Management API Reference, `GetProducts` (Filters of
//! Type TERM_MATCH, Field, Value; FormatVersion aws_v1; PriceList is an array of JSON strings) and
//! aws-cli `awscli/examples/pricing/get-products.rst` (a PriceList entry: product.attributes with
//! `location` and `usagetype`, terms.OnDemand.<term>.priceDimensions.<rate>.unit and
//! pricePerUnit.USD).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_pricing::types::{Filter, FilterType};

use super::prices;

/// Longest the whole lookup may take, every question together: deploy waits for it between the
/// diff and the question, so it must never be felt.
pub const LOOKUP_LIMIT: Duration = Duration::from_secs(5);

/// A product an estimate prices, as the Price List names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Product {
    /// Linux, shared tenancy, on-demand, an hour.
    Instance(String),
    NatGatewayHour,
    InterfaceEndpointHour,
    NlbHour,
    EfsStandardGbMonth,
    SnapshotGbMonth,
    Gp3GbMonth,
    /// A standard-resolution metric alarm, a month.
    AlarmMonth,
}

/// What GetProducts is asked for one product, and how its answer is narrowed: the usage type's
/// region prefix differs by region (`USE2-`, `EU-`, none in us-east-1), so it is matched on its
/// suffix after the answer instead of sent as a filter.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub service_code: &'static str,
    pub filters: Vec<(&'static str, String)>,
    pub unit: &'static str,
    pub usagetype_suffix: Option<&'static str>,
}

/// The Price List's `location` attribute for a region: its own names, which are not always the
/// console's (eu-west-1 is "EU (Ireland)" in the Price List, "Europe (Ireland)" in the console).
/// Taken from the products' attributes as the Price List publishes them (the aws-cli example's
/// "Asia Pacific (Singapore)"; AmazonEC2 offer files pair `regionCode` eu-west-1 with `location`
/// "EU (Ireland)"). A region not listed here gets no call and the table's figures.
pub fn location(region: &str) -> Option<&'static str> {
    Some(match region {
        "us-east-1" => "US East (N. Virginia)",
        "us-east-2" => "US East (Ohio)",
        "us-west-1" => "US West (N. California)",
        "us-west-2" => "US West (Oregon)",
        "ca-central-1" => "Canada (Central)",
        "eu-west-1" => "EU (Ireland)",
        "eu-west-2" => "EU (London)",
        "eu-west-3" => "EU (Paris)",
        "eu-central-1" => "EU (Frankfurt)",
        "eu-north-1" => "EU (Stockholm)",
        "ap-south-1" => "Asia Pacific (Mumbai)",
        "ap-southeast-1" => "Asia Pacific (Singapore)",
        "ap-southeast-2" => "Asia Pacific (Sydney)",
        "ap-northeast-1" => "Asia Pacific (Tokyo)",
        "sa-east-1" => "South America (Sao Paulo)",
        _ => return None,
    })
}

impl Product {
    pub fn query(&self, location: &str) -> Query {
        let loc = ("location", location.to_string());
        let q = |service_code, family: &str, mut more: Vec<(&'static str, String)>, unit, suffix| {
            let mut filters = vec![("productFamily", family.to_string()), loc.clone()];
            filters.append(&mut more);
            Query { service_code, filters, unit, usagetype_suffix: suffix }
        };
        match self {
            // The attribute set of the Price List's own EC2 instance examples (operatingSystem,
            // tenancy, preInstalledSw, licenseModel, capacitystatus): without capacitystatus and
            // preInstalledSw a type matches its reservation and SQL-bundled products too.
            Product::Instance(t) => q(
                "AmazonEC2",
                "Compute Instance",
                vec![
                    ("instanceType", t.clone()),
                    ("operatingSystem", "Linux".into()),
                    ("tenancy", "Shared".into()),
                    ("preInstalledSw", "NA".into()),
                    ("licenseModel", "No License required".into()),
                    ("capacitystatus", "Used".into()),
                ],
                "Hrs",
                None,
            ),
            Product::NatGatewayHour => q("AmazonEC2", "NAT Gateway", vec![], "Hrs", Some("NatGateway-Hours")),
            Product::InterfaceEndpointHour => q("AmazonVPC", "VpcEndpoint", vec![], "Hrs", Some("VpcEndpoint-Hours")),
            // Hours and capacity units are two usage types of one family (ELB User Guide,
            // "Understand codes for Elastic Load Balancing in billing and usage reports":
            // region-LoadBalancerUsage in hours, region-LCUUsage in LCUs); only the hours are fixed.
            Product::NlbHour => q("AWSELB", "Load Balancer-Network", vec![], "Hrs", Some("LoadBalancerUsage")),
            Product::EfsStandardGbMonth => q("AmazonEFS", "Storage", vec![("storageClass", "General Purpose".into())], "GB-Mo", Some("TimedStorage-ByteHrs")),
            Product::SnapshotGbMonth => q("AmazonEC2", "Storage Snapshot", vec![], "GB-Mo", Some("EBS:SnapshotUsage")),
            Product::Gp3GbMonth => q("AmazonEC2", "Storage", vec![("volumeApiName", "gp3".into())], "GB-Mo", Some("EBS:VolumeUsage.gp3")),
            // High-resolution alarms are charged more (CloudWatch API Reference, PutMetricAlarm
            // `Period`) under their own usage type: the standard one is matched exactly.
            Product::AlarmMonth => q("AmazonCloudWatch", "Alarm", vec![], "Alarms", Some("CW:AlarmMonitorUsage")),
        }
    }

    fn label(&self) -> String {
        match self {
            Product::Instance(t) => format!("{t} instance hour"),
            Product::NatGatewayHour => "NAT gateway hour".into(),
            Product::InterfaceEndpointHour => "interface endpoint hour".into(),
            Product::NlbHour => "Network Load Balancer hour".into(),
            Product::EfsStandardGbMonth => "EFS Standard GB-month".into(),
            Product::SnapshotGbMonth => "EBS snapshot GB-month".into(),
            Product::Gp3GbMonth => "gp3 GB-month".into(),
            Product::AlarmMonth => "CloudWatch alarm-month".into(),
        }
    }
}

/// The prices an estimate draws on: those the Price List answered, with when it was asked, and
/// why any were not (said once with the estimate).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Book {
    /// Micro-dollars per unit.
    pub live: BTreeMap<Product, i64>,
    /// When the Price List was asked (RFC 3339, UTC), if it was.
    pub asked_at: Option<String>,
    /// Why some or all prices came from the table.
    pub fallback: Option<String>,
}

impl Book {
    /// The shipped table only (`--prices table`): no call was made.
    pub fn table() -> Self {
        Self::default()
    }
}

/// Asks GetProducts for each product at once, bounded by `limit` as a whole; what is not
/// settled in time falls back to the table.
pub async fn fetch(client: &aws_sdk_pricing::Client, region: &str, products: &BTreeSet<Product>, limit: Duration) -> Book {
    if products.is_empty() {
        // Nothing to price: nothing asked, and the estimate must not claim the API's prices.
        return Book::table();
    }
    let asked_at = aws_smithy_types::DateTime::from(std::time::SystemTime::now())
        .fmt(aws_smithy_types::date_time::Format::DateTime)
        .unwrap_or_default()
        .split('.')
        .next()
        .unwrap_or_default()
        .trim_end_matches('Z')
        .to_string()
        + "Z";
    let mut book = Book { asked_at: Some(asked_at), ..Book::default() };
    let Some(loc) = location(region) else {
        book.fallback = Some(format!("the AWS Price List API was not asked: no Price List location name is known for region {region}"));
        return book;
    };
    let answers: Arc<Mutex<BTreeMap<Product, Result<i64, String>>>> = Arc::default();
    let mut set = tokio::task::JoinSet::new();
    for p in products {
        let (client, p, answers) = (client.clone(), p.clone(), answers.clone());
        let q = p.query(loc);
        set.spawn(async move {
            let r = ask(&client, &q).await;
            answers.lock().unwrap_or_else(|e| e.into_inner()).insert(p, r);
        });
    }
    let timed_out = tokio::time::timeout(limit, async { while set.join_next().await.is_some() {} }).await.is_err();
    // A question still out is abandoned, never left running past the estimate.
    set.abort_all();
    let answers = std::mem::take(&mut *answers.lock().unwrap_or_else(|e| e.into_inner()));
    let mut failed: Vec<String> = Vec::new();
    for p in products {
        match answers.get(p) {
            Some(Ok(micro)) => {
                book.live.insert(p.clone(), *micro);
            }
            Some(Err(why)) => failed.push(format!("{}: {why}", p.label())),
            None if timed_out => failed.push(format!("{}: no answer within {:.1}s", p.label(), limit.as_secs_f64())),
            None => failed.push(format!("{}: the lookup failed", p.label())),
        }
    }
    if !failed.is_empty() {
        let all = failed.len() == products.len();
        book.fallback = Some(format!(
            "{} from the price table dated {} (AWS Price List API{}: {})",
            if all { "every price".to_string() } else { format!("{} of {} prices", failed.len(), products.len()) },
            prices::DATE,
            if timed_out { ", not answering in time" } else { "" },
            failed.join("; ")
        ));
    }
    book
}

async fn ask(client: &aws_sdk_pricing::Client, q: &Query) -> Result<i64, String> {
    let mut req = client.get_products().service_code(q.service_code).format_version("aws_v1").max_results(100);
    for (field, value) in &q.filters {
        req = req.filters(Filter::builder().r#type(FilterType::TermMatch).field(*field).value(value).build().map_err(|e| e.to_string())?);
    }
    let out = req.send().await.map_err(|e| match crate::aws::code(&e) {
        Some(code) => code.to_string(),
        None => format!("no answer ({})", e),
    })?;
    if out.next_token().is_some_and(|t| !t.is_empty()) {
        return Err("more than 100 products match: ambiguous".into());
    }
    price_of(out.price_list(), q)
}

/// The one on-demand price in USD, in micro-dollars, of the products that match the query's unit
/// and usage type; none, or more than one distinct price, is no answer.
pub fn price_of(price_list: &[String], q: &Query) -> Result<i64, String> {
    let mut found: BTreeSet<i64> = BTreeSet::new();
    for entry in price_list {
        let v: serde_json::Value = serde_json::from_str(entry).map_err(|e| format!("a PriceList entry is not JSON: {e}"))?;
        let usage = v["product"]["attributes"]["usagetype"].as_str().unwrap_or_default();
        if let Some(suffix) = q.usagetype_suffix
            && !(usage == suffix || usage.ends_with(&format!("-{suffix}")))
        {
            continue;
        }
        let Some(terms) = v["terms"]["OnDemand"].as_object() else { continue };
        for term in terms.values() {
            let Some(dims) = term["priceDimensions"].as_object() else { continue };
            for d in dims.values().filter(|d| d["unit"].as_str() == Some(q.unit)) {
                let usd = d["pricePerUnit"]["USD"].as_str().ok_or("a price dimension without pricePerUnit.USD")?;
                found.insert(micro(usd).ok_or_else(|| format!("price `{usd}` is not a decimal number"))?);
            }
        }
    }
    match found.len() {
        1 => Ok(*found.first().expect("one price")),
        0 => Err(format!("no product matched ({} returned)", price_list.len())),
        n => Err(format!("{n} different prices matched: ambiguous")),
    }
}

/// "0.0188000000" as micro-dollars (18_800), rounded half up at the seventh decimal.
pub fn micro(usd: &str) -> Option<i64> {
    let (whole, frac) = usd.trim().split_once('.').unwrap_or((usd.trim(), ""));
    if whole.is_empty() && frac.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: i64 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
    let mut digits: Vec<i64> = frac.bytes().map(|b| i64::from(b - b'0')).collect();
    digits.resize(digits.len().max(7), 0);
    let six = digits[..6].iter().fold(0, |acc, d| acc * 10 + d);
    let round = i64::from(digits[6] >= 5);
    whole.checked_mul(1_000_000)?.checked_add(six + round)
}
