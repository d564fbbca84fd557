//! Node-local configuration: the node config file and the workloads file, parsed once into validated
//! types. Parse errors name the file, the line and the field; a bad file never replaces a good one
//! (callers keep the last good value).
mod kubernetes;
mod node;
mod workloads;

pub use kubernetes::{CgroupDriver, KubernetesConfig, WorkloadSource};
pub(crate) use node::parse_duration;
pub use node::{
    AdminConfig, CaptureConfig, CertificatesConfig, HboneLimits, InboundMode, NodeConfig,
    OutboundUnknown, Ports,
};
pub use workloads::{LocalPod, Protocol, Workload, WorkloadSet};

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// serde_yaml's message already names the field and its line and column.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: PathBuf,
        field: String,
        message: String,
    },
}

pub fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn parse_yaml<T: serde::de::DeserializeOwned>(
    path: &Path,
    text: &str,
) -> Result<T, ConfigError> {
    serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}
