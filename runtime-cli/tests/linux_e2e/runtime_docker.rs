//! A real engine: Docker (dockerd, started by the test with its own containerd) runs an
//! imported busybox image with kata-snap as a registered runtime (`--add-runtime`), beside
//! runc, Docker's default: `docker run` (output, status, stdin) and `docker exec` (output,
//! status, stdin, into a running container), then `docker rm -f`; the /etc/hostname,
//! /etc/hosts and /etc/resolv.conf Docker binds (copied by kata-snap), one of them read-only.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{BIN, Output, collect, run_command};
use crate::guest::*;
use crate::runtime::*;
use crate::runtime_net::http_get;

const DOCKERD: &str = "/usr/sbin/dockerd";
const DOCKER: &str = "/usr/bin/docker";
const IMAGE: &str = "ks-busybox:latest";

/// What one runtime gave for each step.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    run: (String, i32),
    run_stdin: (String, i32),
    exec: (String, i32),
    exec_stdin: (String, i32),
    rm: i32,
    /// Docker's /etc/hostname, a `-v` read-only /etc/hosts, its /etc/resolv.conf.
    files: (String, i32),
}

/// A dockerd of the test's own (with its own containerd), kata-snap registered beside runc,
/// the busybox image imported; stopped on drop.
struct Dockerd {
    child: std::process::Child,
    host: String,
    dir: std::path::PathBuf,
}

impl Dockerd {
    /// None: Docker is not here (SKIPPED, never in CI). `network`: dockerd's network options.
    fn start(d: &Path, e: &Env, network: &[&str]) -> Option<Self> {
        for b in [DOCKERD, DOCKER, "/usr/bin/containerd"] {
            if !Path::new(b).exists() {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "CI must provide Docker in the rig (scripts/install-deps.sh, scripts/rig/rung4.sh)"
                );
                println!("SKIPPED: {b} missing (apt-get install docker.io)");
                return None;
            }
        }
        let sock = d.join("docker.sock");
        let host = format!("unix://{}", sock.display());
        step("start dockerd");
        // No iptables (the rig has none): the vfs storage driver (works on any filesystem),
        // cgroupfs.
        let child = Command::new(DOCKERD)
            .arg("--data-root")
            .arg(d.join("root"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("docker.pid"))
            .arg("-H")
            .arg(&host)
            .args(["--iptables=false", "--ip6tables=false", "--ip-masq=false"])
            .args(network)
            .args([
                "--storage-driver=vfs",
                "--exec-opt",
                "native.cgroupdriver=cgroupfs",
            ])
            .arg("--add-runtime")
            .arg(format!("kata-snap={BIN}"))
            .env("KATA_SNAP_CONFIG", &e.config)
            .env("KATA_SNAP_DATA_DIR", &e.data)
            // The rig's root is an initramfs, where runc's pivot_root fails: Docker's switch
            // for that makes its runtimes run with --no-pivot (kata-snap accepts and ignores
            // it).
            .env("DOCKER_RAMDISK", "1")
            .stdin(Stdio::null())
            .stdout(fs::File::create(d.join("dockerd.log")).unwrap())
            .stderr(fs::File::create(d.join("dockerd.err")).unwrap())
            .spawn()
            .unwrap();
        let daemon = Self {
            child,
            host,
            dir: d.to_owned(),
        };
        let end = Instant::now() + T;
        while run_it(daemon.docker(), &["version"]).code() != 0 {
            assert!(
                Instant::now() < end,
                "dockerd did not come up{}",
                daemon.logs()
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        let rootfs = busybox_tree(&d.join("image-rootfs"));
        let tar = d.join("rootfs.tar");
        let o = run_command(
            {
                let mut c = Command::new("tar");
                c.arg("-C").arg(&rootfs).arg("-cf").arg(&tar).arg(".");
                c
            },
            T,
        );
        assert_eq!(o.code(), 0, "tar: {o:?}");
        let o = run_it(daemon.docker(), &["import", tar.to_str().unwrap(), IMAGE]);
        assert_eq!(o.code(), 0, "docker import: {o:?}{}", daemon.logs());
        Some(daemon)
    }

    fn docker(&self) -> Command {
        let mut c = Command::new(DOCKER);
        c.arg("-H").arg(&self.host);
        c
    }

    /// The end of dockerd's log, for a failure's message.
    fn logs(&self) -> String {
        format!(
            "\ndockerd: {}",
            fs::read_to_string(self.dir.join("dockerd.err"))
                .unwrap_or_default()
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        )
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SIGTERM: dockerd stops the containerd it started (SIGKILL would leave it running).
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if crate::common::wait_deadline(&mut self.child, Duration::from_secs(60)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn test_docker_runs_and_execs_through_kata_snap_as_with_runc() {
    let Some(art) = setup() else { return };
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    let d = dir.path();
    // No network (the containers use --network none).
    let Some(daemon) = Dockerd::start(d, e, &["--ip-forward=false", "--bridge=none"]) else {
        return;
    };
    let docker = || daemon.docker();
    let logs = || daemon.logs();
    let with_stdin = |args: &[&str], input: &[u8]| -> Output {
        let mut c = docker();
        c.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = c.spawn().unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        collect(child, T, &args.join(" "))
    };
    let mut seen = Vec::new();
    for runtime in ["kata-snap", "runc"] {
        step(format!("docker with runtime {runtime}"));
        let base = ["--runtime", runtime, "--network", "none"];
        let t0 = Instant::now();
        let mut args = vec!["run", "--rm"];
        args.extend(base);
        args.extend([IMAGE, "sh", "-c", "echo from docker; echo err >&2; exit 3"]);
        let run = run_it(docker(), &args);
        measure(&format!("docker_run_{runtime}"), ms_since(t0));
        assert!(run.stderr.contains("err"), "{runtime}: {run:?}{}", logs());

        let mut args = vec!["run", "--rm", "-i"];
        args.extend(base);
        args.extend([IMAGE, "sh", "-c", "cat; echo done"]);
        let run_stdin = with_stdin(&args, b"hi\n");

        let mut args = vec!["run", "-d", "--name", "d2"];
        args.extend(base);
        args.extend([IMAGE, "sleep", "600"]);
        let o = run_it(docker(), &args);
        assert_eq!(o.code(), 0, "{runtime}: {o:?}{}", logs());
        let t0 = Instant::now();
        let exec = run_it(
            docker(),
            &["exec", "d2", "sh", "-c", "echo from exec; exit 4"],
        );
        measure(&format!("docker_exec_{runtime}"), ms_since(t0));
        let exec_stdin = with_stdin(&["exec", "-i", "d2", "sh", "-c", "cat; echo done"], b"in\n");
        let rm = run_it(docker(), &["rm", "-f", "d2"]);
        // Docker binds its own hostname and resolv.conf, and the user's hosts (`-v ...:ro`
        // replaces Docker's): kata-snap copies them in, the hosts read-only.
        let hosts = d.join("hosts");
        fs::write(&hosts, "127.0.0.1 mine\n").unwrap();
        let volume = format!("{}:/etc/hosts:ro", hosts.display());
        let mut args = vec!["run", "--rm", "--hostname", "ks-host", "-v", &volume];
        args.extend(base);
        args.extend([
            IMAGE,
            "sh",
            "-c",
            "cat /etc/hostname /etc/hosts; test -e /etc/resolv.conf && echo resolv; \
             echo x >> /etc/hosts 2>/dev/null || echo hosts-ro; \
             echo y >> /etc/hostname && echo hostname-rw",
        ]);
        let files = run_it(docker(), &args);
        assert_eq!(
            fs::read_to_string(&hosts).unwrap(),
            "127.0.0.1 mine\n",
            "{runtime}"
        );
        seen.push((
            runtime,
            Seen {
                run: (run.stdout.clone(), run.code()),
                run_stdin: (run_stdin.stdout.clone(), run_stdin.code()),
                exec: (exec.stdout.clone(), exec.code()),
                exec_stdin: (exec_stdin.stdout.clone(), exec_stdin.code()),
                rm: rm.code(),
                files: (files.stdout.clone(), files.code()),
            },
        ));
        if runtime == "kata-snap" {
            let want = Seen {
                run: ("from docker\n".into(), 3),
                run_stdin: ("hi\ndone\n".into(), 0),
                exec: ("from exec\n".into(), 4),
                exec_stdin: ("in\ndone\n".into(), 0),
                rm: 0,
                files: (
                    "ks-host\n127.0.0.1 mine\nresolv\nhosts-ro\nhostname-rw\n".into(),
                    0,
                ),
            };
            assert_eq!(seen[0].1, want, "{}", logs());
            // Nothing is left in Docker's runtime state for kata-snap.
            let ps = run_it(docker(), &["ps", "-aq"]);
            assert_eq!(ps.stdout.trim(), "", "{ps:?}");
        }
    }
    if let [(_, ks), (_, runc)] = &seen[..] {
        assert_eq!(ks, runc, "kata-snap vs runc");
    }
}

/// The bridge dockerd makes (`--bip`), its gateway address on the host.
const BRIDGE_GATEWAY: &str = "172.29.0.1";
/// The address the test's DNS server gives every name.
const DNS_ANSWER: [u8; 4] = [10, 29, 29, 29];

/// A DNS server for one test on `addr:53` (UDP): every A query gets [`DNS_ANSWER`], any other
/// type an empty answer. Stops when the returned flag is set.
fn dns_server(addr: &str) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let sock = std::net::UdpSocket::bind((addr, 53)).expect("bind the test's DNS server");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let flag = stop.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while !flag.load(Ordering::Relaxed) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let q = &buf[..n];
            // The header, then one question: labels up to the root, type, class.
            let Some(end) = q
                .get(12..)
                .and_then(|b| b.iter().position(|&l| l == 0))
                .map(|p| 12 + p + 1 + 4)
                .filter(|&e| e <= n)
            else {
                continue;
            };
            let is_a = q[end - 4..end - 2] == [0, 1];
            let mut r = Vec::with_capacity(end + 16);
            r.extend_from_slice(&q[..2]);
            r.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
            r.extend_from_slice(&q[12..end]);
            if is_a {
                // The name by pointer to the question, A, IN, TTL 60, 4 bytes.
                r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
                r.extend_from_slice(&DNS_ANSWER);
            }
            let _ = sock.send_to(&r, from);
        }
    });
    stop
}

/// Docker's default bridge network, through kata-snap as through runc: dockerd's
/// `libnetwork-setkey` prestart hook configures the container's network namespace (the
/// supervisor's own), whose interface the guest takes. A server container is published
/// (`-p`: docker-proxy on the host reaches it at its bridge address); a second container
/// reaches it by address (its ARP entry for it is the server's MAC, the one Docker gave it:
/// clones of one template each have their own), reaches a server on the host, and resolves a
/// name through the DNS server Docker wrote in its resolv.conf (`--dns`).
#[test]
fn test_docker_default_bridge_publish_dns_and_neighbours_as_with_runc() {
    let Some(art) = setup() else { return };
    if !Path::new("/usr/sbin/docker-proxy").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must provide docker-proxy in the rig (scripts/rig/rung4.sh)"
        );
        println!("SKIPPED: /usr/sbin/docker-proxy missing (apt-get install docker.io)");
        return;
    }
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    let d = dir.path();
    let bip = format!("--bip={BRIDGE_GATEWAY}/24");
    let Some(daemon) = Dockerd::start(
        d,
        e,
        &[
            &bip,
            "--ip-forward=false",
            "--userland-proxy=true",
            "--userland-proxy-path=/usr/sbin/docker-proxy",
        ],
    ) else {
        return;
    };
    let docker = || daemon.docker();
    let stop_dns = dns_server(BRIDGE_GATEWAY);
    let mut seen = Vec::new();
    for (i, runtime) in ["kata-snap", "runc"].into_iter().enumerate() {
        step(format!("docker bridge with runtime {runtime}"));
        let port = 18080 + i as u16;
        let publish = format!("{port}:80");
        let o = run_it(
            docker(),
            &[
                "run",
                "-d",
                "--name",
                "web",
                "--runtime",
                runtime,
                "-p",
                &publish,
                IMAGE,
                "sh",
                "-c",
                "mkdir -p /www && echo served-by-web > /www/index.html && \
                 cat /sys/class/net/eth0/address > /www/mac && exec httpd -f -p 80 -h /www",
            ],
        );
        assert_eq!(o.code(), 0, "{runtime}: {o:?}{}", daemon.logs());
        let t0 = Instant::now();
        let published = http_get(([127, 0, 0, 1], port).into(), "/index.html");
        measure(
            &format!("docker_bridge_publish_first_reply_{runtime}"),
            ms_since(t0),
        );
        let inspect = run_it(
            docker(),
            &[
                "inspect",
                "-f",
                "{{.NetworkSettings.IPAddress}} {{.NetworkSettings.MacAddress}}",
                "web",
            ],
        );
        let (web_ip, web_mac) = inspect
            .stdout
            .trim()
            .split_once(' ')
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .unwrap_or_default();
        assert!(web_ip.starts_with("172.29.0."), "{runtime}: {inspect:?}");
        // A server on the host's end of the bridge for the client to reach.
        let (host_port, from_client) = crate::runtime_net::one_message_server(BRIDGE_GATEWAY);
        let script = format!(
            "wget -q -O - http://{web_ip}/index.html; \
             test \"$(wget -q -O - http://{web_ip}/mac)\" = {web_mac} && echo mac-is-docker-s; \
             awk '$1 == \"{web_ip}\" {{print $4}}' /proc/net/arp | grep -qx {web_mac} && echo arp-ok; \
             grep -q '^nameserver {BRIDGE_GATEWAY}' /etc/resolv.conf && echo resolv-ok; \
             nslookup ks-name.test | grep -q '{a}' && echo dns-ok; \
             echo from-the-client | nc {BRIDGE_GATEWAY} {host_port} && echo host-ok",
            a = std::net::Ipv4Addr::from(DNS_ANSWER),
        );
        let dns = format!("--dns={BRIDGE_GATEWAY}");
        let client = run_it(
            docker(),
            &[
                "run",
                "--rm",
                "--runtime",
                runtime,
                &dns,
                IMAGE,
                "sh",
                "-c",
                &script,
            ],
        );
        let rm = run_it(docker(), &["rm", "-f", "web"]);
        let got_from_client = from_client.join().unwrap();
        seen.push((
            runtime,
            (
                published.clone(),
                client.stdout.clone(),
                client.code(),
                got_from_client,
                rm.code(),
            ),
        ));
        assert_eq!(
            seen[i].1,
            (
                "served-by-web\n".to_string(),
                "served-by-web\nmac-is-docker-s\narp-ok\nresolv-ok\ndns-ok\nhost-ok\n".to_string(),
                0,
                "from-the-client\n".to_string(),
                0,
            ),
            "{runtime}: {client:?}{}",
            daemon.logs()
        );
    }
    stop_dns.store(true, std::sync::atomic::Ordering::Relaxed);
    let ps = run_it(docker(), &["ps", "-aq"]);
    assert_eq!(ps.stdout.trim(), "", "{ps:?}");
}

/// Docker `-v` through kata-snap as through runc: a host directory (read-write) and a host file
/// (`:ro`) in the container ([`Volume`]): what the host put there is read, the read-only file
/// cannot be written, a link to a host file outside the directory does not lead out, and what
/// the container writes is on the host, owned by the container's user.
#[test]
fn test_docker_volumes_as_with_runc() {
    let Some(art) = setup() else { return };
    let e = env(&art);
    let dir = tempfile::tempdir_in(&e.dir).unwrap();
    let d = dir.path();
    let Some(daemon) = Dockerd::start(d, e, &["--ip-forward=false", "--bridge=none"]) else {
        return;
    };
    for runtime in ["kata-snap", "runc"] {
        step(format!("docker -v with runtime {runtime}"));
        let v = Volume::new(d, runtime);
        let dir_volume = format!("{}:/data", v.dir.display());
        let file_volume = format!("{}:/etc/app.conf:ro", v.file.display());
        let t0 = Instant::now();
        let o = run_it(
            daemon.docker(),
            &[
                "run",
                "--rm",
                "--runtime",
                runtime,
                "--network",
                "none",
                "-v",
                &dir_volume,
                "-v",
                &file_volume,
                IMAGE,
                "sh",
                "-c",
                Volume::SCRIPT,
            ],
        );
        measure(&format!("docker_run_volumes_{runtime}"), ms_since(t0));
        assert_eq!(
            (o.stdout.as_str(), o.code()),
            (VOLUME_SEEN, 0),
            "{runtime}: {o:?}{}",
            daemon.logs()
        );
        assert_eq!(v.host_view(), VOLUME_HOST_VIEW, "{runtime}");
    }
}
