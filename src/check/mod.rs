//! Every validator: the rendered user-data (`userdata`: built-in structure checks, cloud-init
//! schema, shellcheck, the compose model), the SSM Automation document (`automation`), and the
//! cfn-guard security policies on a template (`guard`). Checks read what the renderer made; they
//! never reach AWS or the command line.

pub mod automation;
pub mod guard;
pub mod userdata;
