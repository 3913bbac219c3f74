//! The one integration-test binary: `cargo test --test it`.

#[macro_use]
mod mock_client;

mod alarms;
mod api_auth;
mod backup;
mod bake_mocks;
mod bake_moto;
mod boot;
mod cli;
mod contracts;
mod corpus;
mod cost;
mod faults;
mod fleet;
mod fleet_mocks;
mod fuzz;
mod gc;
mod interrupt;
mod layers;
mod logs;
mod mocks;
mod moto;
mod protection;
mod readme;
mod render;
mod secrets;
mod services;
mod smoke;
mod ssm_sim;
mod stack_aws;
mod support;
mod template;
mod validators;
