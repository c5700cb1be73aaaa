//! A service in a container is found by host-wide mode, attached through its host pid and
//! its executable as the container sees it, and its series carry the container's labels.
//!
//! The "container" is built the way a runtime builds one, with what every Linux host has:
//! new mount and pid namespaces (`unshare`), a root of its own holding the binary at a path
//! that does not exist on the host (`chroot` into a tmpfs seen only inside), and a cgroup
//! named the way the kubelet's systemd driver names a pod's container. The node's log
//! directory, where the kubelet's file names give namespace, pod and container, is a
//! temporary one the daemon is pointed at.

mod support;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use leakscope_testkit::types::TasksResponse;
use support::*;

/// The cgroup v2 mount (`/sys/fs/cgroup` on a v2 host, `/sys/fs/cgroup/unified` on a
/// hybrid one).
fn cgroup2_mount() -> PathBuf {
    let mounts = std::fs::read_to_string("/proc/mounts").expect("reading /proc/mounts");
    mounts
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(fields[1]))
        })
        .expect("a cgroup2 hierarchy is mounted")
}

/// Removes the cgroup directories (innermost first) once the container's process is gone.
struct Cgroups(Vec<PathBuf>);

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in self.0.iter().rev() {
            let _ = eventually_removed(dir);
        }
    }
}

fn eventually_removed(dir: &Path) -> Result<(), String> {
    leakscope_testkit::poll(
        "cgroup removed",
        Duration::from_secs(10),
        || match std::fs::remove_dir(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.to_string()),
        },
    )
}

/// The host pid of the only child of process `pid`.
fn only_child(pid: u32) -> u32 {
    eventually(
        "the container's process has started",
        Duration::from_secs(10),
        || {
            let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                .map_err(|e| e.to_string())?;
            children
                .split_whitespace()
                .next()
                .and_then(|c| c.parse().ok())
                .ok_or_else(|| "no child yet".to_string())
        },
    )
}

#[test]
fn a_service_in_a_container_is_found_attached_and_labelled() {
    if !ebpf_available("containers") {
        return;
    }
    let tag = std::process::id();
    let pod_uid = format!("5e1f0a2b-7c3d-4e5f-8a9b-{tag:012x}");
    let container_id = format!("{:0>64}", format!("c0ffee{tag:x}"));
    // Only this test's container path is scanned (it exists inside the container alone).
    let inside = format!("/leakscope-ctr-{tag}");

    let cgroup_root = cgroup2_mount();
    let pod_slice = format!("kubepods-besteffort-pod{}.slice", pod_uid.replace('-', "_"));
    let dirs = [
        cgroup_root.join("kubepods.slice"),
        cgroup_root.join("kubepods.slice/kubepods-besteffort.slice"),
        cgroup_root.join(format!("kubepods.slice/kubepods-besteffort.slice/{pod_slice}")),
        cgroup_root.join(format!(
            "kubepods.slice/kubepods-besteffort.slice/{pod_slice}/cri-containerd-{container_id}.scope"
        )),
    ];
    for dir in &dirs {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    }
    // Only the directories this test made are removed (the slices may be shared).
    let _cgroups = Cgroups(dirs[2..].to_vec());
    let scope = &dirs[3];

    let node_logs = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(node_logs.path().join("containers")).unwrap();
    std::fs::write(
        node_logs
            .path()
            .join(format!("containers/cart-7d9f_shop_api-{container_id}.log")),
        "",
    )
    .unwrap();

    // The container's root: a tmpfs seen only inside its mount namespace, made the root
    // with pivot_root (the host's root unmounted, as runtimes do, so the kernel names its
    // files as the container sees them), holding the host's /usr for the C library and the
    // fixture as /leakscope-ctr-N/server.
    let mount_point = tempfile::tempdir().unwrap();
    let root = mount_point.path().display().to_string();
    let script = format!(
        "set -e
         echo $$ > {procs}
         mount -t tmpfs tmpfs {root}
         mkdir -p {root}/usr {root}/proc {root}/old {root}{inside}
         mount --bind /usr {root}/usr
         mount -t proc proc {root}/proc
         ln -s usr/lib {root}/lib
         ln -s usr/lib64 {root}/lib64
         ln -s usr/bin {root}/bin
         cp {fixture} {root}{inside}/server
         cd {root}
         pivot_root . old
         umount -l /old
         exec {inside}/server",
        procs = scope.join("cgroup.procs").display(),
        fixture = fixture("axum-app").display(),
    );
    let mut unshare = Command::new("unshare");
    unshare
        .args([
            "--mount",
            "--pid",
            "--fork",
            "--kill-child",
            "sh",
            "-c",
            &script,
        ])
        .stdout(Stdio::piped());
    let mut container = Proc {
        child: unshare.spawn().expect("starting unshare"),
        name: "container".into(),
    };
    let mut stdout = BufReader::new(container.child.stdout.take().unwrap());
    let mut line = String::new();
    stdout
        .read_line(&mut line)
        .expect("reading the server's first line");
    let addr: std::net::SocketAddr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("the server printed {line:?}"))
        .parse()
        .unwrap();
    let server = only_child(container.pid());
    assert!(
        !Path::new(&format!("{inside}/server")).exists(),
        "the container's binary must not be visible on the host"
    );

    let (_daemon, daemon) = start_daemon(&[
        "--heap".into(),
        "exact".into(),
        "--all".into(),
        "--all-under".into(),
        inside.clone(),
        "--node-log-dir".into(),
        node_logs.path().display().to_string(),
    ]);
    wait_attached(daemon, server);
    for _ in 0..5 {
        get_ok(addr, "/leak/forever");
    }
    let site = "axum_app::leak_forever::{{closure}}::{{closure}}";
    let labels = [
        ("pid", server.to_string()),
        ("site", site.to_string()),
        ("container_id", container_id.clone()),
        ("pod_uid", pod_uid.clone()),
        ("namespace", "shop".to_string()),
        ("pod", "cart-7d9f".to_string()),
        ("container", "api".to_string()),
    ];
    let matching: Vec<(&str, &str)> = labels.iter().map(|(k, v)| (*k, v.as_str())).collect();
    eventually(
        "the leak is counted under the container's labels",
        Duration::from_secs(30),
        || {
            let alive = sum(&scrape(daemon), "leakscope_tasks_alive", &matching);
            (alive == 5.0)
                .then_some(())
                .ok_or(format!("alive {alive} with labels {labels:?}"))
        },
    );
    // Its heap probes went into its own C library, reached through its root.
    eventually(
        "the container's heap is tracked under its labels",
        Duration::from_secs(30),
        || {
            let pod = [
                ("pid", server.to_string()),
                ("pod", "cart-7d9f".to_string()),
            ];
            let pod: Vec<(&str, &str)> = pod.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let allocated = sum(
                &scrape(daemon),
                "leakscope_heap_allocated_bytes_total",
                &pod,
            );
            (allocated > 0.0)
                .then_some(())
                .ok_or(format!("allocated {allocated}"))
        },
    );
    let tasks: TasksResponse = Client::new(daemon).tasks().expect("/api/v1/tasks");
    let process = tasks
        .processes
        .iter()
        .find(|p| p.pid == server)
        .expect("the container's process is listed");
    assert_eq!(process.exe, "server");
    assert_eq!(
        process.labels.get("pod").map(String::as_str),
        Some("cart-7d9f")
    );
    assert_eq!(
        process.labels.get("unit"),
        None,
        "a container's scope is not a unit"
    );

    // The same service under a rule that excludes its namespace is left alone, and the
    // self-metrics say so.
    let (_excluding, excluding) = start_daemon(&[
        "--all".into(),
        "--all-under".into(),
        inside.clone(),
        "--node-log-dir".into(),
        node_logs.path().display().to_string(),
        "--exclude".into(),
        "namespace=sh*".into(),
    ]);
    eventually("the exclusion is counted", Duration::from_secs(10), || {
        let excluded = sum(
            &scrape(excluding),
            "leakscope_host_processes",
            &[("state", "excluded")],
        );
        (excluded == 1.0)
            .then_some(())
            .ok_or(format!("{excluded} excluded"))
    });
    let tasks: TasksResponse = Client::new(excluding).tasks().expect("/api/v1/tasks");
    assert!(tasks.processes.is_empty(), "{:?}", tasks.processes);
}
