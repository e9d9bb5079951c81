//! Parsing of `serve`'s options: listen addresses, client access, export
//! points and owners.

use crate::error::{Error, Result};

/// `ADDR` or `ADDR:PORT` (IPv6 as `[ADDR]:PORT` or a bare address).
pub(super) fn parse_listen(s: &str, default_port: u16, what: &str) -> Result<std::net::SocketAddr> {
    if let Ok(a) = s.parse::<std::net::SocketAddr>() {
        return Ok(a);
    }
    let ip = s.trim_start_matches('[').trim_end_matches(']');
    ip.parse::<std::net::IpAddr>()
        .map(|ip| std::net::SocketAddr::new(ip, default_port))
        .map_err(|_| Error::invalid(format!("{what} {s:?}: expected ADDR or ADDR:PORT")))
}

/// `--nbd`: `ADDR[:PORT]` (port 10809 unless given) or `unix:PATH`.
pub(super) fn parse_nbd_listen(l: &str) -> Result<crate::export::nbd::Listen> {
    use crate::export::nbd::Listen;
    match l.strip_prefix("unix:") {
        // Blank, it would be a socket named by spaces in the working
        // directory, or an error about making a path absolute.
        Some(p) if p.trim().is_empty() => Err(Error::invalid(format!(
            "--nbd {l:?}: no socket path: give unix:PATH"
        ))),
        Some(p) => std::path::absolute(p)
            .map(Listen::Unix)
            .map_err(|e| Error::io(format!("--nbd {l}"), e)),
        None => parse_listen(l, 10809, "--nbd").map(Listen::Tcp),
    }
}

/// `--allow` (or its old name `--nfs-allow`): the client networks of
/// every network frontend, NFS and NBD over TCP; loopback if none given.
/// Refused without a network frontend to apply to.
pub(super) fn allow_list(allow: &[String], network_frontends: bool) -> Result<Vec<ipnet::IpNet>> {
    if allow.is_empty() {
        return Ok(crate::export::loopback_only());
    }
    if !network_frontends {
        return Err(Error::invalid(
            "--allow needs a network export: --nfs ADDR, --nbd ADDR or --export-point",
        ));
    }
    allow
        .iter()
        .map(|a| {
            a.parse::<ipnet::IpNet>()
                .or_else(|_| a.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    Error::invalid(format!(
                        "--allow {a:?}: expected a network (198.18.0.0/15) or an address"
                    ))
                })
        })
        .collect()
}

pub(super) fn nfs_options(
    listen: &[String],
    allow: &[ipnet::IpNet],
    root_squash: bool,
    write_through: bool,
    owner: Option<(u32, u32)>,
    export_points: bool,
    max_connections: usize,
) -> Result<Option<crate::export::nfs::NfsOptions>> {
    if listen.is_empty() && !export_points {
        return Ok(None);
    }
    let most = crate::export::nfs::NfsOptions::MOST_CONNECTIONS;
    if !(1..=most).contains(&max_connections) {
        return Err(Error::invalid(format!(
            "--nfs-max-connections {max_connections}: it must be from 1 to {most}"
        )));
    }
    let listen = listen
        .iter()
        .map(|a| parse_listen(a, 2049, "--nfs"))
        .collect::<Result<Vec<_>>>()?;
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    let me = unsafe { (libc::getuid(), libc::getgid()) };
    Ok(Some(crate::export::nfs::NfsOptions {
        listen,
        allow: allow.to_vec(),
        root_squash,
        anon: (65534, 65534),
        write_through,
        owner: owner.unwrap_or(me),
        limits: Default::default(),
        max_connections,
    }))
}

/// `--export-point` specs (or the default point) and the connection limit.
pub(super) fn placement_config(
    specs: &[String],
    max_connections_per_host: usize,
    nfs: &[String],
    nbd: &[String],
) -> Result<crate::session::PlacementConfig> {
    if max_connections_per_host == 0 {
        return Err(Error::invalid(
            "--max-connections-per-host must be at least 1",
        ));
    }
    let mut cfg = crate::session::PlacementConfig {
        max_connections_per_host,
        ..Default::default()
    };
    if specs.is_empty() {
        return Ok(cfg);
    }
    if !nfs.is_empty() || !nbd.is_empty() {
        return Err(Error::invalid(
            "--nfs/--nbd and --export-point do not mix: each export point serves NFS and NBD on its own listen=ADDR",
        ));
    }
    cfg.points = specs
        .iter()
        .map(|s| crate::placement::PointSpec::parse(s))
        .collect::<Result<Vec<_>>>()?;
    crate::placement::check_points(&cfg.points)?;
    Ok(cfg)
}

/// `UID:GID`, numbers or names.
pub(super) fn parse_owner(s: &str) -> Result<(u32, u32)> {
    let (u, g) = s
        .split_once(':')
        .ok_or_else(|| Error::invalid(format!("--owner {s:?}: expected UID:GID")))?;
    let uid = match u.parse::<u32>() {
        Ok(n) => n,
        Err(_) => nix::unistd::User::from_name(u)
            .ok()
            .flatten()
            .map(|x| x.uid.as_raw())
            .ok_or_else(|| Error::not_found(format!("--owner: no user named {u:?}")))?,
    };
    let gid = crate::api::peer::group_id(g).map_err(|e| e.context("--owner"))?;
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_nbd_unix_socket_without_a_path_is_refused_saying_what_to_give() {
        use crate::export::nbd::Listen;
        let cwd = std::env::current_dir().unwrap();
        assert!(matches!(parse_nbd_listen("unix:/run/n.sock"),
            Ok(Listen::Unix(p)) if p == std::path::Path::new("/run/n.sock")));
        assert!(matches!(parse_nbd_listen("unix:n.sock"),
            Ok(Listen::Unix(p)) if p == cwd.join("n.sock")));
        assert!(matches!(
            parse_nbd_listen("127.0.0.1"),
            Ok(Listen::Tcp(a)) if a.port() == 10809
        ));
        for bad in ["unix:", "unix:  "] {
            let e = parse_nbd_listen(bad).expect_err("an empty path accepted");
            assert_eq!(e.kind(), crate::error::ErrorKind::InvalidInput, "{e}");
            assert!(e.to_string().contains("unix:PATH"), "{e}");
        }
    }

    #[test]
    fn nfs_max_connections_outside_one_to_the_most_is_refused_by_name() {
        let opts = |n| nfs_options(&["127.0.0.1".into()], &[], true, false, None, false, n);
        assert_eq!(opts(256).unwrap().unwrap().max_connections, 256);
        for n in [0, usize::MAX] {
            let e = opts(n).unwrap_err().to_string();
            assert!(
                e.contains("--nfs-max-connections") && e.contains("from 1 to"),
                "{e}"
            );
        }
    }

    #[test]
    fn the_allow_list_defaults_to_loopback_takes_networks_and_addresses_and_needs_a_network_export()
    {
        assert_eq!(
            allow_list(&[], false).unwrap(),
            crate::export::loopback_only()
        );
        let l = allow_list(&["198.18.0.0/15".into(), "192.0.2.7".into()], true).unwrap();
        assert_eq!(
            l,
            [
                "198.18.0.0/15".parse().unwrap(),
                "192.0.2.7/32".parse().unwrap()
            ]
        );
        let e = allow_list(&["198.18.0.0/99".into()], true).unwrap_err();
        assert!(e.to_string().contains("expected a network"), "{e}");
        let e = allow_list(&["198.18.0.0/15".into()], false).unwrap_err();
        assert!(
            e.to_string().contains("--allow needs a network export"),
            "{e}"
        );
    }
}
