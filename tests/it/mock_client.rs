//! The SDK client builder the scripted-response suites (mocks.rs, bake_mocks.rs) share.

/// A client of `$krate` answering only from `$rules` (MatchAny), with `$retry`.
macro_rules! mocked {
    ($krate:ident, $rules:expr, $retry:expr) => {{
        let mut interceptor = aws_smithy_mocks::MockResponseInterceptor::new().rule_mode(aws_smithy_mocks::RuleMode::MatchAny);
        for rule in $rules.iter() {
            interceptor = interceptor.with_rule(rule);
        }
        $krate::Client::from_conf(
            $krate::config::Builder::new()
                .behavior_version($krate::config::BehaviorVersion::latest())
                .region($krate::config::Region::new("us-east-1"))
                .credentials_provider($krate::config::Credentials::new("AKIDMOCKS", "mocks", None, None, "aws-smithy-mocks"))
                .http_client(aws_smithy_mocks::create_mock_http_client())
                .retry_config($retry)
                .interceptor(interceptor)
                .build(),
        )
    }};
}

/// The clients a test does not script: each answers from no rules, so any call it makes fails
/// loudly. Test literals name the clients they script and take the rest from here
/// (`..mock_client::unscripted()`), so a new client in `aws::Clients` touches no test.
pub fn unscripted() -> imgbuild::aws::Clients {
    let none: Vec<aws_smithy_mocks::Rule> = Vec::new();
    let retry = aws_smithy_types::retry::RetryConfig::disabled();
    imgbuild::aws::Clients {
        cfn: mocked!(aws_sdk_cloudformation, none, retry.clone()),
        ec2: mocked!(aws_sdk_ec2, none, retry.clone()),
        efs: mocked!(aws_sdk_efs, none, retry.clone()),
        ssm: mocked!(aws_sdk_ssm, none, retry.clone()),
        elb: mocked!(aws_sdk_elasticloadbalancingv2, none, retry.clone()),
        apigw: mocked!(aws_sdk_apigateway, none, retry.clone()),
        backup: mocked!(aws_sdk_backup, none, retry.clone()),
        kms: mocked!(aws_sdk_kms, none, retry.clone()),
        cloudwatch: mocked!(aws_sdk_cloudwatch, none, retry.clone()),
        pricing: mocked!(aws_sdk_pricing, none, retry.clone()),
        sts: mocked!(aws_sdk_sts, none, retry),
        kms_as: imgbuild::aws::KmsAs::new(|account, region, _| panic!("no KMS client scripted for account {account} in {region}")),
    }
}
