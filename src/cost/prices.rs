//! The dated price table shipped with the tool: on-demand list prices in USD, Linux, no free
//! tier, no savings plans. Taken on 2026-11-29 from what the docs search held:
//! - EFS Standard storage $0.30/GB-month: the Amazon EFS pricing page (aws.amazon.com/efs/pricing).
//! - NAT gateway $0.045/hour and public IPv4 address $0.005/hour (us-east-1): quoted from the
//!   Amazon VPC pricing page by third-party pricing guides (2026); the AWS page itself was not in
//!   the corpus: list price as of 2026-11-29, unverified here.
//! - Interface VPC endpoint $0.01/hour per AZ: AWS PrivateLink pricing page (its per-GB tiers were
//!   in the corpus; the hourly figure from third-party guides): unverified here.
//! - NLB $0.0225/hour, EBS snapshots $0.05/GB-month, gp3 $0.08/GB-month, EC2 on-demand rates:
//!   list prices as of 2026-11-29, unverified here (the AWS pages were not in the corpus).
//! - The regions besides us-east-1: list prices as of 2026-11-29, unverified here.
//! - CloudWatch standard-resolution alarm $0.10/alarm-month: quoted by third-party guides (2026);
//!   the AWS pricing page's text in the corpus shows only the free tier (10 standard alarm
//!   metrics a month, not taken off here): unverified. High-resolution alarms cost more
//!   (CloudWatch API Reference, PutMetricAlarm `Period`); the template has none.
//! - A customer managed KMS key $1/month, the same in every region: the AWS KMS Developer Guide
//!   ("AWS KMS keys") says customer managed keys carry a monthly fee and AWS managed keys none;
//!   the figure is quoted by third-party guides: unverified. Requests beyond the free tier are
//!   usage, not counted.
//!
//! Checked again on 2026-11-29 (issue 15) against what the `search` corpora hold: AWS's pricing
//! pages there (Amazon VPC, PrivateLink, ELB, EBS, CloudWatch) carry their rate tables as dynamic
//! placeholders, so no hourly or GB-month figure above could be read from AWS itself; the marks
//! stay. What AWS pages did confirm is the shape of what is billed: NLB hours and LCUs are
//! separate usage types (`region-LoadBalancerUsage`, `region-LCUUsage`: ELB User Guide,
//! "Understand codes for Elastic Load Balancing in billing and usage reports"), endpoints bill
//! per AZ while provisioned (AWS PrivateLink pricing page), and EBS snapshots bill the GB-months
//! stored (AWS Knowledge Center, "EBS snapshot billing"). `prices: auto` asks the Price List API
//! for the live figures and uses these only where it does not answer.
//!
//! Rates are in micro-dollars so monthly figures come out exact to the cent.

/// When the table was taken, said with every estimate.
pub const DATE: &str = "2026-11-29";
/// Hours in AWS's pricing month (the calculator's 730).
pub const HOURS_PER_MONTH: i64 = 730;

#[derive(Debug, Clone, Copy)]
pub struct Prices {
    pub region: &'static str,
    pub nat_gateway_hour: i64,
    pub public_ipv4_hour: i64,
    pub interface_endpoint_az_hour: i64,
    pub nlb_hour: i64,
    pub efs_standard_gb_month: i64,
    pub snapshot_gb_month: i64,
    pub gp3_gb_month: i64,
    /// A standard-resolution CloudWatch metric alarm, a month (unverified, see above).
    pub cloudwatch_alarm_month: i64,
    /// A customer managed KMS key, a month (unverified, see above).
    pub kms_key_month: i64,
    /// (instance type, µ$ an hour), Linux on-demand.
    pub instances: &'static [(&'static str, i64)],
}

const US_INSTANCES: &[(&str, i64)] = &[
    ("t3.micro", 10_400),
    ("t3.small", 20_800),
    ("t3.medium", 41_600),
    ("t3.large", 83_200),
    ("t3a.micro", 9_400),
    ("t3a.small", 18_800),
    ("t3a.medium", 37_600),
    ("t3a.large", 75_200),
    ("t4g.micro", 8_400),
    ("t4g.small", 16_800),
    ("t4g.medium", 33_600),
    ("t4g.large", 67_200),
    ("m5.large", 96_000),
    ("m6i.large", 96_000),
    ("m7g.large", 81_600),
];

const US: Prices = Prices {
    region: "us-east-1",
    nat_gateway_hour: 45_000,
    public_ipv4_hour: 5_000,
    interface_endpoint_az_hour: 10_000,
    nlb_hour: 22_500,
    efs_standard_gb_month: 300_000,
    snapshot_gb_month: 50_000,
    gp3_gb_month: 80_000,
    cloudwatch_alarm_month: 100_000,
    kms_key_month: 1_000_000,
    instances: US_INSTANCES,
};

pub const TABLE: &[Prices] = &[
    US,
    Prices { region: "us-east-2", ..US },
    Prices { region: "us-west-2", ..US },
    Prices {
        region: "eu-west-1",
        nat_gateway_hour: 48_000,
        public_ipv4_hour: 5_000,
        interface_endpoint_az_hour: 11_000,
        nlb_hour: 25_200,
        efs_standard_gb_month: 330_000,
        snapshot_gb_month: 50_000,
        gp3_gb_month: 88_000,
        cloudwatch_alarm_month: 100_000,
        kms_key_month: 1_000_000,
        instances: &[
            ("t3.micro", 11_400),
            ("t3.small", 22_800),
            ("t3.medium", 45_600),
            ("t3.large", 91_200),
            ("t3a.small", 20_400),
            ("t3a.medium", 40_800),
            ("t3a.large", 81_600),
            ("t4g.small", 18_400),
            ("t4g.medium", 36_800),
            ("m5.large", 107_000),
        ],
    },
];

pub fn for_region(region: &str) -> Option<&'static Prices> {
    TABLE.iter().find(|p| p.region == region)
}

impl Prices {
    pub fn instance_hour(&self, instance_type: &str) -> Option<i64> {
        self.instances.iter().find(|(t, _)| *t == instance_type).map(|(_, p)| *p)
    }
}
