//! The protocol between the `ferry-cni` plugin and the node's agent: one JSON request line on the
//! agent's CNI socket, one JSON reply line.
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Which pod a request is about, from the runtime's `CNI_ARGS` and `CNI_CONTAINERID`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// `K8S_POD_UID`, when the runtime passes it: tells a re-created pod of the same name apart.
    #[serde(default)]
    pub uid: Option<String>,
    pub container_id: String,
}

impl PodRef {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// The pod's sandbox netns is set up (by the earlier plugins of the chain); enroll it if it is
    /// meshed, before its containers start.
    Add {
        pod: PodRef,
        /// `CNI_NETNS`: the path of the pod's network namespace.
        netns: String,
        /// The pod's addresses from the previous plugins' result.
        ips: Vec<IpAddr>,
    },
    /// The sandbox goes away: un-enroll.
    Del { pod: PodRef },
    /// Is the pod enrolled if it must be?
    Check { pod: PodRef },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Reply {
    /// The agent did what was asked (or, for `check`, the pod is as it must be).
    pub ok: bool,
    /// Whether the pod is meshed (so enrolled on success).
    #[serde(default)]
    pub meshed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    pub fn done(meshed: bool) -> Self {
        Self {
            ok: true,
            meshed,
            error: None,
        }
    }

    pub fn failed(meshed: bool, error: impl Into<String>) -> Self {
        Self {
            ok: false,
            meshed,
            error: Some(error.into()),
        }
    }
}

/// Default path of the agent's CNI socket on the node.
pub const DEFAULT_SOCKET: &str = "/run/ferry/cni.sock";
