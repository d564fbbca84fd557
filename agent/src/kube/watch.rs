//! The pod and namespace watches (kube-rs watchers, list then watch, resumed from the last
//! resourceVersion) feeding [`Cluster`]. While the API is unreachable the last known state stays in
//! force and the watchers retry with a capped exponential backoff.
use std::{collections::HashMap, sync::Arc, time::Duration};

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, utils::Backoff, watcher},
};

use super::{
    Shared,
    cluster::{PodInfo, namespace_labels},
};

/// Exponential from `MIN` to `MAX`; reset after an event arrives.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(8);

pub struct Retry {
    next: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self { next: BACKOFF_MIN }
    }
}

impl Iterator for Retry {
    type Item = Duration;
    fn next(&mut self) -> Option<Duration> {
        let now = self.next;
        self.next = (self.next * 2).min(BACKOFF_MAX);
        Some(now)
    }
}

impl Backoff for Retry {
    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }
}

/// A watch that is established but quiet yields nothing, so a reconnect would only show with the
/// next change: a cheap `GET /version` tells sooner, and also notices a connection that died
/// silently.
const HEALTH_UP: Duration = Duration::from_secs(10);
const HEALTH_DOWN: Duration = Duration::from_secs(1);

pub async fn health(client: Client, shared: Arc<Shared>) {
    loop {
        let up = shared.connected.load(std::sync::atomic::Ordering::Acquire);
        tokio::time::sleep(if up { HEALTH_UP } else { HEALTH_DOWN }).await;
        match tokio::time::timeout(HEALTH_UP, client.apiserver_version()).await {
            Ok(Ok(_)) => shared.api_up(),
            Ok(Err(e)) => shared.api_down(&e.to_string()),
            Err(_) => shared.api_down("the API server did not answer within 10s"),
        }
    }
}

pub async fn pods(client: Client, shared: Arc<Shared>) {
    let api: Api<Pod> = Api::all(client);
    let mut stream = watcher(api, watcher::Config::default())
        .backoff(Retry::default())
        .boxed();
    let mut relist: Option<HashMap<String, PodInfo>> = None;
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                shared.api_down(&e.to_string());
                continue;
            }
        };
        shared.api_up();
        let info = |p: &Pod| PodInfo::from_pod(p);
        match ev {
            watcher::Event::Init => relist = Some(HashMap::new()),
            watcher::Event::InitApply(p) => {
                if let (Some(buf), Some(i)) = (relist.as_mut(), info(&p)) {
                    buf.insert(i.key(), i);
                }
            }
            watcher::Event::InitDone => {
                let pods = relist.take().unwrap_or_default();
                shared.update(|c| {
                    c.pods = pods;
                    c.pods_synced = true;
                    c.forget_gone();
                });
            }
            watcher::Event::Apply(p) => {
                if let Some(i) = info(&p) {
                    shared.update(|c| {
                        c.pods.insert(i.key(), i);
                    });
                }
            }
            watcher::Event::Delete(p) => {
                if let Some(i) = info(&p) {
                    shared.update(|c| {
                        c.pods.remove(&i.key());
                        // A later pod of the same name is a new sandbox.
                        c.cni.remove(&i.key());
                        c.deleted.remove(&i.key());
                        c.forget_gone();
                    });
                }
            }
        }
    }
}

pub async fn namespaces(client: Client, shared: Arc<Shared>) {
    let api: Api<Namespace> = Api::all(client);
    let mut stream = watcher(api, watcher::Config::default())
        .backoff(Retry::default())
        .boxed();
    let mut relist: Option<HashMap<String, _>> = None;
    while let Some(ev) = stream.next().await {
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                shared.api_down(&e.to_string());
                continue;
            }
        };
        shared.api_up();
        match ev {
            watcher::Event::Init => relist = Some(HashMap::new()),
            watcher::Event::InitApply(ns) => {
                if let (Some(buf), Some((name, labels))) = (relist.as_mut(), namespace_labels(&ns))
                {
                    buf.insert(name, labels);
                }
            }
            watcher::Event::InitDone => {
                let all = relist.take().unwrap_or_default();
                shared.update(|c| {
                    c.namespaces = all;
                    c.namespaces_synced = true;
                });
            }
            watcher::Event::Apply(ns) => {
                if let Some((name, labels)) = namespace_labels(&ns) {
                    shared.update(|c| {
                        c.namespaces.insert(name, labels);
                    });
                }
            }
            watcher::Event::Delete(ns) => {
                if let Some((name, _)) = namespace_labels(&ns) {
                    shared.update(|c| {
                        c.namespaces.remove(&name);
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut r = Retry::default();
        let first: Vec<_> = r.by_ref().take(8).collect();
        assert_eq!(first[0], BACKOFF_MIN);
        assert_eq!(first[1], BACKOFF_MIN * 2);
        assert_eq!(first[7], BACKOFF_MAX);
        r.reset();
        assert_eq!(r.next(), Some(BACKOFF_MIN));
    }
}
