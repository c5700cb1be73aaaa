//! Which service, container and pod a process belongs to, learned on the node alone (no API
//! server): the systemd unit and container id from the process's cgroup path, the pod's
//! uid from the kubelet's cgroup naming, and the namespace, pod and container names from
//! the kubelet's log directories (or, failing those, from files inside the container).
//!
//! Recognised cgroup layouts (v2, or any v1 hierarchy):
//! - systemd services: `…/NAME.service` → `unit`;
//! - Kubernetes pods, systemd cgroup driver:
//!   `kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _>.slice/<runtime>-<id>.scope`;
//! - Kubernetes pods, cgroupfs driver: `kubepods/<qos>/pod<uid>/<id>`;
//! - containerd (`cri-containerd-<id>.scope`), CRI-O (`crio-<id>.scope`; its `crio-conmon-`
//!   monitor is not the container), Docker (`docker-<id>.scope`, or `/docker/<id>` with
//!   the cgroupfs driver), Podman (`libpod-<id>.scope`).
//!
//! Names: the kubelet links every container's log as
//! `/var/log/containers/<pod>_<namespace>_<container>-<container id>.log`, and keeps
//! `/var/log/pods/<namespace>_<pod>_<pod uid>/<container>/`. Neither name may contain `_`
//! (they are DNS labels), which is what makes both file names unambiguous.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What is known of the service a process belongs to; absent parts are unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Workload {
    /// The systemd service (`nginx.service`).
    pub unit: Option<String>,
    /// The container runtime's id of the container (64 hex digits).
    pub container_id: Option<String>,
    /// The container runtime, as its cgroup names it (`containerd`, `crio`, `docker`, `podman`).
    pub runtime: Option<&'static str>,
    /// The Kubernetes pod's uid.
    pub pod_uid: Option<String>,
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub container: Option<String>,
}

impl Workload {
    /// The Prometheus labels this workload adds to a process's series, known parts only
    /// (an empty label is the same as none to Prometheus).
    pub fn labels(&self) -> Vec<(&'static str, String)> {
        [
            ("unit", &self.unit),
            ("container_id", &self.container_id),
            ("pod_uid", &self.pod_uid),
            ("namespace", &self.namespace),
            ("pod", &self.pod),
            ("container", &self.container),
        ]
        .into_iter()
        .filter_map(|(name, value)| Some((name, value.clone()?)))
        .collect()
    }

    /// True when the process runs in a container leakscope recognised.
    pub fn in_container(&self) -> bool {
        self.container_id.is_some()
    }
}

/// The workload of every attached process, by pid: the daemon's registry writes it as it
/// attaches and detaches, the exporters read it to label each process's series.
#[derive(Debug, Clone, Default)]
pub struct Workloads(Arc<Mutex<HashMap<u32, Arc<Workload>>>>);

impl Workloads {
    pub fn set(&self, pid: u32, workload: Workload) {
        self.lock().insert(pid, Arc::new(workload));
    }

    pub fn forget(&self, pid: u32) {
        self.lock().remove(&pid);
    }

    /// The workload of `pid`; unknown (no labels) for a process not attached.
    pub fn get(&self, pid: u32) -> Arc<Workload> {
        self.lock().get(&pid).cloned().unwrap_or_default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<Workload>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Where the node keeps what names containers, so a test (or an unusual node) can point
/// elsewhere than `/var/log`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFiles {
    /// The directory holding the kubelet's `containers/` and `pods/` log directories.
    pub log_dir: PathBuf,
}

impl Default for NodeFiles {
    fn default() -> Self {
        Self {
            log_dir: PathBuf::from("/var/log"),
        }
    }
}

/// Learns the workload of process `pid` now: its cgroup, then the node's files. Nothing
/// here fails: what cannot be read stays unknown.
pub fn of_process(pid: u32, node: &NodeFiles) -> Workload {
    let mut workload = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .map(|cgroups| from_cgroups(&cgroups))
        .unwrap_or_default();
    if let Some(id) = &workload.container_id {
        if let Some((pod, namespace, container)) = names_from_container_logs(&node.log_dir, id) {
            workload.pod = Some(pod);
            workload.namespace = Some(namespace);
            workload.container = Some(container);
        } else if let Some(uid) = &workload.pod_uid
            && let Some((namespace, pod)) = names_from_pod_logs(&node.log_dir, uid)
        {
            workload.namespace = Some(namespace);
            workload.pod = Some(pod);
        }
        if workload.pod_uid.is_some() {
            names_from_container_root(pid, &mut workload);
        }
    }
    workload
}

/// Parses `/proc/PID/cgroup`. The v2 line (`0::`) is read first, then the v1 hierarchies:
/// on a v1 or hybrid host the container's path is in the controllers' lines.
pub fn from_cgroups(cgroups: &str) -> Workload {
    let paths = cgroups.lines().filter_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (id, _controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        Some((id != "0", path))
    });
    let mut paths: Vec<(bool, &str)> = paths.collect();
    paths.sort_by_key(|&(v1, _)| v1);
    let mut best = Workload::default();
    for (_, path) in paths {
        let workload = from_cgroup_path(path);
        let known = |w: &Workload| {
            usize::from(w.container_id.is_some()) * 2 + usize::from(w.unit.is_some())
        };
        if known(&workload) > known(&best) {
            best = workload;
        }
    }
    best
}

/// Parses one cgroup path. Components are matched by shape, so a path relative to a cgroup
/// namespace (`/../../kubepods.slice/…`) reads the same.
pub fn from_cgroup_path(path: &str) -> Workload {
    let mut workload = Workload::default();
    let components: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let in_kubepods = components
        .iter()
        .any(|c| *c == "kubepods" || c.starts_with("kubepods.") || c.starts_with("kubepods-"));
    for (i, component) in components.iter().enumerate() {
        if let Some(unit) = component.strip_suffix(".service") {
            workload.unit = Some(format!("{unit}.service"));
        }
        if in_kubepods && let Some(uid) = pod_uid(component) {
            workload.pod_uid = Some(uid);
        }
        if let Some((runtime, id)) = container_scope(component) {
            workload.runtime = Some(runtime);
            workload.container_id = Some(id.to_string());
        } else if is_container_id(component)
            && i > 0
            && (components[i - 1] == "docker" || pod_uid(components[i - 1]).is_some())
        {
            // cgroupfs driver: the id is the directory's whole name.
            workload.runtime = (components[i - 1] == "docker").then_some("docker");
            workload.container_id = Some((*component).to_string());
        }
    }
    workload
}

/// `kubepods-burstable-pod<uid with _>.slice` or `pod<uid>`: the pod's uid.
fn pod_uid(component: &str) -> Option<String> {
    let tail = match component.strip_suffix(".slice") {
        Some(slice) => &slice[slice.rfind("-pod")? + 4..],
        None => component.strip_prefix("pod")?,
    };
    let uid = tail.replace('_', "-");
    let shape_ok = uid.len() == 36
        && uid.chars().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        });
    shape_ok.then_some(uid)
}

/// `<runtime>-<id>.scope`: the runtime and the container id.
fn container_scope(component: &str) -> Option<(&'static str, &str)> {
    let scope = component.strip_suffix(".scope")?;
    let (runtime, id) = [
        ("cri-containerd-", "containerd"),
        ("crio-", "crio"),
        ("docker-", "docker"),
        ("libpod-", "podman"),
    ]
    .into_iter()
    .find_map(|(prefix, runtime)| Some((runtime, scope.strip_prefix(prefix)?)))?;
    is_container_id(id).then_some((runtime, id))
}

fn is_container_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `<log_dir>/containers/<pod>_<namespace>_<container>-<id>.log` → (pod, namespace,
/// container).
fn names_from_container_logs(log_dir: &Path, id: &str) -> Option<(String, String, String)> {
    let suffix = format!("-{id}.log");
    std::fs::read_dir(log_dir.join("containers"))
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .find_map(|name| parse_container_log_name(name.strip_suffix(&suffix)?))
}

fn parse_container_log_name(stem: &str) -> Option<(String, String, String)> {
    let mut parts = stem.splitn(3, '_');
    let (pod, namespace, container) = (parts.next()?, parts.next()?, parts.next()?);
    [pod, namespace, container]
        .iter()
        .all(|p| !p.is_empty())
        .then(|| {
            (
                pod.to_string(),
                namespace.to_string(),
                container.to_string(),
            )
        })
}

/// `<log_dir>/pods/<namespace>_<pod>_<uid>/` → (namespace, pod).
fn names_from_pod_logs(log_dir: &Path, uid: &str) -> Option<(String, String)> {
    let suffix = format!("_{uid}");
    std::fs::read_dir(log_dir.join("pods"))
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .find_map(|name| {
            let (namespace, pod) = name.strip_suffix(&suffix)?.split_once('_')?;
            Some((namespace.to_string(), pod.to_string()))
        })
}

/// Last resort inside a pod: the service account's namespace file in the container's own
/// root, and the pod name the kubelet sets as the container's hostname (`HOSTNAME`).
fn names_from_container_root(pid: u32, workload: &mut Workload) {
    if workload.namespace.is_none() {
        workload.namespace = std::fs::read_to_string(format!(
            "/proc/{pid}/root/var/run/secrets/kubernetes.io/serviceaccount/namespace"
        ))
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    }
    if workload.pod.is_none() {
        workload.pod = std::fs::read(format!("/proc/{pid}/environ"))
            .ok()
            .and_then(|environ| {
                environ.split(|&b| b == 0).find_map(|var| {
                    let value = var.strip_prefix(b"HOSTNAME=")?;
                    String::from_utf8(value.to_vec()).ok()
                })
            })
            .filter(|s| !s.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f8c1e1d2b7a4c0e9d6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d";
    const UID: &str = "0f2b3c4d-1a2b-4c3d-8e9f-a0b1c2d3e4f5";

    #[test]
    fn systemd_service() {
        let w = from_cgroups("0::/system.slice/payments.service\n");
        assert_eq!(w.unit.as_deref(), Some("payments.service"));
        assert!(!w.in_container());
    }

    #[test]
    fn kubelet_systemd_driver_containerd() {
        let path = format!(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/\
             cri-containerd-{ID}.scope",
            UID.replace('-', "_")
        );
        let w = from_cgroup_path(&path);
        assert_eq!(w.pod_uid.as_deref(), Some(UID));
        assert_eq!(w.container_id.as_deref(), Some(ID));
        assert_eq!(w.runtime, Some("containerd"));
        assert_eq!(w.unit, None);
        // Guaranteed pods have no QoS slice; a cgroup namespace shows a relative path.
        let guaranteed = format!(
            "/../../kubepods.slice/kubepods-pod{}.slice/crio-{ID}.scope",
            UID.replace('-', "_")
        );
        let w = from_cgroup_path(&guaranteed);
        assert_eq!(w.pod_uid.as_deref(), Some(UID));
        assert_eq!(w.runtime, Some("crio"));
    }

    #[test]
    fn kubelet_cgroupfs_driver_and_docker() {
        let w = from_cgroup_path(&format!("/kubepods/besteffort/pod{UID}/{ID}"));
        assert_eq!(w.pod_uid.as_deref(), Some(UID));
        assert_eq!(w.container_id.as_deref(), Some(ID));
        let w = from_cgroup_path(&format!("/docker/{ID}"));
        assert_eq!(
            (w.runtime, w.container_id.as_deref()),
            (Some("docker"), Some(ID))
        );
        let w = from_cgroup_path(&format!("/system.slice/docker-{ID}.scope"));
        assert_eq!(
            (w.runtime, w.container_id.as_deref()),
            (Some("docker"), Some(ID))
        );
        assert_eq!(w.unit, None, "a container's scope is not a unit");
    }

    #[test]
    fn conmon_and_lookalikes_are_not_containers() {
        assert!(!from_cgroup_path(&format!("/system.slice/crio-conmon-{ID}.scope")).in_container());
        assert!(!from_cgroup_path("/user.slice/user-1000.slice/session-3.scope").in_container());
        // A pod-like name outside kubepods is no pod.
        assert_eq!(from_cgroup_path(&format!("/pod{UID}/x")).pod_uid, None);
        assert!(!from_cgroup_path(&format!("/docker/{}", &ID[..63])).in_container());
    }

    #[test]
    fn v1_hierarchies_are_read_when_v2_says_nothing() {
        let cgroups = format!(
            "12:memory:/kubepods/burstable/pod{UID}/{ID}\n1:name=systemd:/kubepods/burstable/\
             pod{UID}/{ID}\n0::/\n"
        );
        let w = from_cgroups(&cgroups);
        assert_eq!(w.container_id.as_deref(), Some(ID));
        assert_eq!(w.pod_uid.as_deref(), Some(UID));
        assert_eq!(from_cgroups("garbage\n\n::\n"), Workload::default());
    }

    #[test]
    fn names_from_the_kubelets_log_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("containers")).unwrap();
        std::fs::create_dir_all(dir.path().join(format!("pods/shop_cart-7d9f_{UID}/api"))).unwrap();
        std::fs::write(
            dir.path()
                .join(format!("containers/cart-7d9f_shop_api-{ID}.log")),
            "",
        )
        .unwrap();
        std::fs::write(dir.path().join("containers/other_shop_api-0123.log"), "").unwrap();
        assert_eq!(
            names_from_container_logs(dir.path(), ID),
            Some(("cart-7d9f".into(), "shop".into(), "api".into()))
        );
        assert_eq!(
            names_from_container_logs(dir.path(), &ID.replace('3', "4")),
            None
        );
        assert_eq!(
            names_from_pod_logs(dir.path(), UID),
            Some(("shop".into(), "cart-7d9f".into()))
        );
    }

    #[test]
    fn labels_hold_known_parts_only() {
        let w = Workload {
            unit: Some("a.service".into()),
            pod: Some("p".into()),
            ..Workload::default()
        };
        assert_eq!(
            w.labels(),
            vec![("unit", "a.service".to_string()), ("pod", "p".to_string())]
        );
    }
}
