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
