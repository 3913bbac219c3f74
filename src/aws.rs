//! The AWS side, built in one place: profile, region, endpoint URL, retries, timeouts. Clients
//! are made here, at the edge, and passed down, so tests hand in moto-backed or mocked clients.

use std::sync::Arc;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_smithy_types::error::metadata::ProvideErrorMetadata;

use crate::error::Error;

/// What the AWS layer needs to build clients: plain values, so this layer knows neither the config
/// file nor the command line.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub profile: Option<String>,
    pub region: Option<String>,
    pub endpoint_url: Option<String>,
    pub adaptive_retries: bool,
    pub max_attempts: u32,
    /// One API call, retries included.
    pub operation_timeout: Duration,
}

/// Attempts per call when cleaning up, whatever `aws.max_attempts` says.
pub const CLEANUP_ATTEMPTS: u32 = 8;

/// Every client a command may need. Cheap to clone (each is an `Arc` inside).
#[derive(Debug, Clone)]
pub struct Clients {
    pub cfn: aws_sdk_cloudformation::Client,
    pub ec2: aws_sdk_ec2::Client,
    pub efs: aws_sdk_efs::Client,
    pub ssm: aws_sdk_ssm::Client,
    pub elb: aws_sdk_elasticloadbalancingv2::Client,
    pub apigw: aws_sdk_apigateway::Client,
    pub backup: aws_sdk_backup::Client,
    pub kms: aws_sdk_kms::Client,
    pub cloudwatch: aws_sdk_cloudwatch::Client,
    /// The Price List API, which answers only in a few regions: made for the nearest of them, never
    /// from the stack's region (see `pricing_region`).
    pub pricing: aws_sdk_pricing::Client,
    /// STS, to act in another account (`fleet deploy` makes each target account's KMS grant
    /// from that account, through its StackSet execution role).
    pub sts: aws_sdk_sts::Client,
    /// KMS clients with another account's credentials (from `sts`).
    pub kms_as: KmsAs,
}

/// Makes a KMS client in `region` acting with `credentials`, which are `account`'s (from STS
/// AssumeRole). A factory rather than a client, so tests hand in a scripted client per account
/// and see which account made each call.
#[derive(Clone)]
pub struct KmsAs(Arc<MakeKms>);

/// (account, region, credentials) to a KMS client.
type MakeKms = dyn Fn(&str, &str, aws_sdk_kms::config::Credentials) -> aws_sdk_kms::Client + Send + Sync;

impl KmsAs {
    pub fn new(f: impl Fn(&str, &str, aws_sdk_kms::config::Credentials) -> aws_sdk_kms::Client + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// The caller's own KMS client settings (endpoint, retries, timeouts) with the other
    /// account's credentials and the key's region.
    pub fn from_config(base: aws_sdk_kms::Config) -> Self {
        Self::new(move |_account, region, credentials| {
            aws_sdk_kms::Client::from_conf(
                base.to_builder().region(aws_sdk_kms::config::Region::new(region.to_string())).credentials_provider(credentials).build(),
            )
        })
    }

    pub fn client(&self, account: &str, region: &str, credentials: aws_sdk_kms::config::Credentials) -> aws_sdk_kms::Client {
        (self.0)(account, region, credentials)
    }
}

impl std::fmt::Debug for KmsAs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KmsAs(..)")
    }
}

impl Clients {
    /// The same clients with a retry budget of their own for cleaning up: a cleanup that gives up
    /// at the first throttle leaves behind exactly what it exists to remove.
    pub fn for_cleanup(&self) -> Self {
        let retry = RetryConfig::standard().with_max_attempts(CLEANUP_ATTEMPTS);
        Self {
            cfn: aws_sdk_cloudformation::Client::from_conf(self.cfn.config().to_builder().retry_config(retry.clone()).build()),
            ec2: aws_sdk_ec2::Client::from_conf(self.ec2.config().to_builder().retry_config(retry.clone()).build()),
            efs: aws_sdk_efs::Client::from_conf(self.efs.config().to_builder().retry_config(retry.clone()).build()),
            ssm: aws_sdk_ssm::Client::from_conf(self.ssm.config().to_builder().retry_config(retry.clone()).build()),
            elb: aws_sdk_elasticloadbalancingv2::Client::from_conf(self.elb.config().to_builder().retry_config(retry.clone()).build()),
            apigw: aws_sdk_apigateway::Client::from_conf(self.apigw.config().to_builder().retry_config(retry.clone()).build()),
            backup: aws_sdk_backup::Client::from_conf(self.backup.config().to_builder().retry_config(retry.clone()).build()),
            kms: aws_sdk_kms::Client::from_conf(self.kms.config().to_builder().retry_config(retry.clone()).build()),
            cloudwatch: aws_sdk_cloudwatch::Client::from_conf(self.cloudwatch.config().to_builder().retry_config(retry.clone()).build()),
            pricing: aws_sdk_pricing::Client::from_conf(self.pricing.config().to_builder().retry_config(retry.clone()).build()),
            sts: aws_sdk_sts::Client::from_conf(self.sts.config().to_builder().retry_config(retry).build()),
            kms_as: self.kms_as.clone(),
        }
    }

    pub fn from_conf(conf: &aws_config::SdkConfig) -> Self {
        let kms = aws_sdk_kms::Client::new(conf);
        Self {
            cfn: aws_sdk_cloudformation::Client::new(conf),
            ec2: aws_sdk_ec2::Client::new(conf),
            efs: aws_sdk_efs::Client::new(conf),
            ssm: aws_sdk_ssm::Client::new(conf),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(conf),
            apigw: aws_sdk_apigateway::Client::new(conf),
            backup: aws_sdk_backup::Client::new(conf),
            kms_as: KmsAs::from_config(kms.config().clone()),
            kms,
            cloudwatch: aws_sdk_cloudwatch::Client::new(conf),
            sts: aws_sdk_sts::Client::new(conf),
            pricing: aws_sdk_pricing::Client::from_conf(
                aws_sdk_pricing::config::Builder::from(conf)
                    .region(aws_sdk_pricing::config::Region::new(pricing_region(conf.region().map(|r| r.as_ref()))))
                    .build(),
            ),
        }
    }
}

/// The Price List Query API answers at two endpoints only, us-east-1 and ap-south-1 (aws-sdk-pricing
/// crate documentation, "Service Endpoint"): the nearer of them to the stack's region.
pub fn pricing_region(region: Option<&str>) -> &'static str {
    match region.unwrap_or_default() {
        r if r.starts_with("ap-") => "ap-south-1",
        _ => "us-east-1",
    }
}

pub fn retry_config(settings: &Settings) -> RetryConfig {
    let base = if settings.adaptive_retries { RetryConfig::adaptive() } else { RetryConfig::standard() };
    base.with_max_attempts(settings.max_attempts)
}

/// Loads the shared config the way the AWS CLI does (env, profile, SSO, ...), then applies the
/// flags and the config file's retry and timeout settings.
pub async fn load(ctx: &Settings) -> Result<aws_config::SdkConfig, Error> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(retry_config(ctx))
        .timeout_config(TimeoutConfig::builder().connect_timeout(Duration::from_secs(10)).operation_timeout(ctx.operation_timeout).build());
    if let Some(p) = &ctx.profile {
        loader = loader.profile_name(p);
    }
    if let Some(r) = &ctx.region {
        loader = loader.region(aws_config::Region::new(r.clone()));
    }
    if let Some(url) = &ctx.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    let conf = loader.load().await;
    if conf.region().is_none() {
        return Err(Error::Invalid("no AWS region: pass --region, set `region:` in imgbuild.yaml, or set AWS_REGION / a region in your profile".into()));
    }
    Ok(conf)
}

/// The error code of an SDK error, when the service sent one. Code, never message text, decides
/// what an error means.
pub fn code<E: ProvideErrorMetadata>(err: &E) -> Option<&str> {
    err.code()
}

/// Turns an SDK error into ours, naming the operation and the resource it was about.
pub fn err<E>(operation: &'static str, resource: impl Into<String>, e: aws_sdk_cloudformation::error::SdkError<E>) -> Error
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let resource = resource.into();
    let (code, message) = match &e {
        aws_sdk_cloudformation::error::SdkError::ServiceError(s) => {
            let status = s.raw().status().as_u16();
            match s.err().code() {
                Some(code) => (code.to_string(), s.err().message().unwrap_or_default().to_string()),
                // An answer without an error code: its HTTP status is all there is to say.
                None => (format!("HTTP {status}"), s.err().message().unwrap_or("the service answered without an error code").to_string()),
            }
        }
        other => ("NoResponse".to_string(), error_chain(other)),
    };
    Error::Aws { operation, resource, code, message }
}

/// The whole source chain of an error, for transport failures whose top line says little.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.dedup();
    parts.join(": ")
}
