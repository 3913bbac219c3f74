//! What render produces, per mode, format and storage option: snapshots of the real output, and
//! the properties that must hold whatever the snapshot says.

use imgbuild::check::userdata::{self as validate, Status, Tools};
use imgbuild::config::Config;
use imgbuild::render::compose::{self as compose, PullPolicy, VolumeKind};
use imgbuild::render::{Format, Mode, USERDATA_LIMIT};

use crate::support::*;

#[test]
fn snapshots_of_every_mode_format_and_storage() {
    for (name, config, region) in configs() {
        for mode in MODES {
            for format in FORMATS {
                let r = render_with(&config, region, mode, format, false);
                let snap = format!("{name}__{}__{}", mode.as_str(), format.as_str());
                insta::assert_snapshot!(snap, String::from_utf8(r.raw.clone()).unwrap());
            }
        }
    }
}

#[test]
fn output_is_deterministic_to_the_byte_including_gzip() {
    for (_, config, region) in configs() {
        for mode in MODES {
            for format in FORMATS {
                for gzip in [false, true] {
                    let a = render_with(&config, region, mode, format, gzip);
                    let b = render_with(&config, region, mode, format, gzip);
                    assert_eq!(a.output, b.output);
                    assert_eq!(a.sha256(), b.sha256());
                }
            }
        }
    }
}

#[test]
fn gzip_output_inflates_to_the_raw_user_data() {
    use std::io::Read;
    let r = render_with(&Config::default(), None, Mode::Full, Format::Mime, true);
    assert_eq!(&r.output[..2], &[0x1f, 0x8b], "gzip magic");
    let mut inflated = Vec::new();
    flate2::read::GzDecoder::new(&r.output[..]).read_to_end(&mut inflated).unwrap();
    assert_eq!(inflated, r.raw);
    assert!(r.output.len() < r.raw.len() / 2, "{} vs {}", r.output.len(), r.raw.len());
}

#[test]
fn version_decides_api_heartbeat_and_data_dir() {
    let cases = [("0.4.13", "/api/v1/heartbeat", "/chroma/chroma"), ("0.6.3", "/api/v2/heartbeat", "/chroma/chroma"), ("1.5.9", "/api/v2/heartbeat", "/data")];
    for (version, heartbeat, data_dir) in cases {
        let config = parse(&format!("chroma:\n  version: {version}\n"));
        let r = render_with(&config, None, Mode::Full, Format::CloudConfig, false);
        let svc = r.compose.service().unwrap();
        assert_eq!(svc.image, format!("ghcr.io/chroma-core/chroma:{version}"));
        assert!(svc.healthcheck.test.join(" ").contains(&format!("GET {heartbeat} ")), "{version}");
        assert_eq!(svc.volumes[0].target, data_dir, "{version}");
        assert!(r.scripts.iter().any(|s| s.text.contains(heartbeat)));
    }
}

#[test]
fn storage_modes_mount_efs_their_own_way() {
    let tls = render_with(&Config::default(), None, Mode::Full, Format::CloudConfig, false);
    let svc = tls.compose.service().unwrap();
    assert_eq!(svc.volumes[0].kind, VolumeKind::Bind);
    assert_eq!(svc.volumes[0].source, "/mnt/chroma/data");
    assert!(tls.compose.volumes.is_empty());
    let boot = &tls.scripts.iter().find(|s| s.name == "20-boot.sh").unwrap().text;
    assert!(boot.contains(" efs _netdev,noresvport,tls,iam,nofail 0 0"), "efs-utils mount with TLS and IAM");
    assert!(tls.start.contains("readonly lock_file=\"${mount_point}/.imgbuild-writer.lock\""), "one writer per file system");
    assert!(tls.scripts[0].text.contains("amazon-efs-utils"));

    let nfs_config = parse("storage:\n  mode: docker-nfs\nefs:\n  file_system_id: fs-0123456789abcdef0\n");
    let nfs = render_with(&nfs_config, Some("eu-west-1"), Mode::Full, Format::CloudConfig, false);
    let vol = &nfs.compose.volumes[compose::NFS_VOLUME];
    assert_eq!(vol.driver_opts["type"], "nfs");
    assert_eq!(vol.driver_opts["device"], ":/data");
    assert_eq!(
        vol.driver_opts["o"],
        "addr=fs-0123456789abcdef0.efs.eu-west-1.amazonaws.com,nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport"
    );
    assert_eq!(nfs.start, tls.start, "the same mount, guards and writer lock in both modes");
    assert!(nfs.scripts[1].text.contains(" nfs4 nfsvers=4.1,rsize=1048576,wsize=1048576,hard,timeo=600,retrans=2,noresvport,_netdev,nofail 0 0"));

    // Unknown at render time: a compose variable the boot script fills from instance metadata.
    let later = render_with(&parse("storage:\n  mode: docker-nfs\n"), None, Mode::Full, Format::CloudConfig, false);
    assert!(later.compose.volumes[compose::NFS_VOLUME].driver_opts["o"].starts_with("addr=${EFS_DNS_NAME},nfsvers=4.1,"));
    assert!(later.cloud_config.contains("#   EFS file system <read at boot from the instance tag ImgbuildFileSystemId"));
}

#[test]
fn full_mode_installs_pinned_compose_and_verifies_it_before_use() {
    let r = render_with(&Config::default(), None, Mode::Full, Format::CloudConfig, false);
    let install = &r.scripts.iter().find(|s| s.name == "10-install.sh").unwrap().text;
    let c = Config::default();
    assert!(install.contains(&format!("readonly compose_version=\"{}\"", c.compose.version)));
    assert!(install.contains(&c.compose.sha256.x86_64) && install.contains(&c.compose.sha256.aarch64));
    let check = install.find("sha256sum --check --status \\").expect("download is checked");
    let place = install.find("install -D -m 0755 \"${download}\"").expect("then installed");
    assert!(check < place, "the checksum is verified before the binary is installed");
    assert!(install.contains("dnf_install docker"), "dnf goes through the retry wrapper");
    assert!(r.compose.service().unwrap().pull_policy.is_none());
}

#[test]
fn baked_mode_has_no_install_step_and_never_pulls() {
    for (_, config, region) in configs() {
        for format in FORMATS {
            let r = render_with(&config, region, Mode::Baked, format, false);
            assert_eq!(r.scripts.len(), 1);
            assert_eq!(r.compose.service().unwrap().pull_policy, Some(PullPolicy::Never));
            let text = String::from_utf8(r.raw.clone()).unwrap();
            for word in ["dnf ", "docker pull", "github.com", "https://"] {
                assert!(!text.contains(word), "baked user-data contains {word}");
            }
            let report = validate::validate(&r, &config, imgbuild::chroma::profile(&"1.5.9".parse().unwrap()).unwrap(), Tools::Off);
            let check = report.checks.iter().find(|c| c.name == "baked boot downloads nothing").unwrap();
            assert_eq!(check.status, Status::Pass);
        }
    }
}

#[test]
fn the_download_check_catches_a_boot_that_fetches() {
    let config = Config::default();
    let mut r = render_with(&config, None, Mode::Baked, Format::CloudConfig, false);
    let profile = imgbuild::chroma::profile(&"1.5.9".parse().unwrap()).unwrap();
    r.scripts[0].text.push_str("curl -fsSL \\\n  -o /tmp/x https://example.invalid/x\n");
    let report = validate::validate(&r, &config, profile, Tools::Off);
    let check = report.checks.iter().find(|c| c.name == "baked boot downloads nothing").unwrap();
    assert_eq!(check.status, Status::Fail, "{}", check.detail);
}

#[test]
fn every_variant_fits_the_ec2_limit_with_margin_reported() {
    for (name, config, region) in configs() {
        for mode in MODES {
            for format in FORMATS {
                let r = render_with(&config, region, mode, format, false);
                assert!(r.raw.len() <= USERDATA_LIMIT, "{name} {mode:?} {format:?}: {}", r.raw.len());
                let profile = imgbuild::chroma::profile(&imgbuild::chroma::parse_version(&config.chroma.version).unwrap()).unwrap();
                let report = validate::validate(&r, &config, profile, Tools::Off);
                assert!(report.ok(), "{name} {mode:?} {format:?}: {:?}", report.failures().collect::<Vec<_>>());
                let size = report.checks.iter().find(|c| c.name == "size").unwrap();
                assert!(size.detail.contains(&format!("margin {}", USERDATA_LIMIT - r.raw.len())), "{}", size.detail);
            }
        }
    }
}

#[test]
fn oversized_user_data_fails_and_names_gzip_as_the_way_out() {
    let mut yaml = String::from("chroma:\n  env:\n");
    for i in 0..20 {
        yaml.push_str(&format!("    SETTING_{i}: '{}'\n", "x".repeat(500)));
    }
    let config = parse(&yaml);
    let profile = imgbuild::chroma::profile(&"1.5.9".parse().unwrap()).unwrap();
    let big = render_with(&config, None, Mode::Full, Format::CloudConfig, false);
    assert!(big.raw.len() > USERDATA_LIMIT);
    let report = validate::validate(&big, &config, profile, Tools::Off);
    let size = report.checks.iter().find(|c| c.name == "size").unwrap();
    assert_eq!(size.status, Status::Fail);
    assert!(size.detail.contains("with --gzip it is"), "{}", size.detail);

    let zipped = render_with(&config, None, Mode::Full, Format::CloudConfig, true);
    let report = validate::validate(&zipped, &config, profile, Tools::Off);
    assert!(report.ok(), "{:?}", report.failures().collect::<Vec<_>>());
}

#[test]
fn user_environment_is_escaped_for_compose_interpolation() {
    let config = parse("chroma:\n  env:\n    GREETING: 'cost $5'\n");
    let r = render_with(&config, None, Mode::Full, Format::CloudConfig, false);
    assert_eq!(r.compose.service().unwrap().environment["GREETING"], "cost $$5");
}

#[test]
fn boot_budget_lists_what_each_mode_downloads() {
    let config = Config::default();
    let full = render_with(&config, None, Mode::Full, Format::CloudConfig, false);
    let kinds: Vec<&str> = full.budget.downloads.iter().map(|d| d.kind).collect();
    assert_eq!(kinds, ["package", "package", "package", "binary", "image"]);
    assert_eq!(full.budget.downloads[2].what, "amazon-cloudwatch-agent", "full mode installs the agent the alarms need");
    assert!(full.scripts[0].text.contains("dnf_install docker amazon-efs-utils amazon-cloudwatch-agent\n"));
    let image = &full.budget.downloads[4].what;
    assert_eq!(image, &full.compose.service().unwrap().image, "the budget names the image the compose file runs");
    assert!(full.scripts[0].text.contains(&format!("readonly image=\"{image}\"")));
    for (_, config, region) in configs() {
        for format in FORMATS {
            let baked = render_with(&config, region, Mode::Baked, format, false);
            assert!(baked.budget.downloads.is_empty(), "{:?}", baked.budget.downloads);
            assert!(baked.budget.steps.iter().any(|s| s.contains("chroma.service")));
        }
    }
}

/// Issue 10, fault 9: the two storage modes kept the data in different directories of the file
/// system (efs-tls `/data`, docker-nfs the root), so switching modes made the collections look
/// gone. Both now use `/data` on EFS; a database left at the root is refused by the boot guard
/// (boot::each_guard_refuses_to_start_chroma_and_the_stack_gets_failure).
#[test]
fn both_storage_modes_keep_the_data_in_the_same_directory_of_the_file_system() {
    let tls = render_with(&Config::default(), None, Mode::Baked, Format::CloudConfig, false);
    let nfs = render_with(&parse("storage:\n  mode: docker-nfs\n"), None, Mode::Baked, Format::CloudConfig, false);
    let mount_point = &Config::default().storage.mount_point;
    let on_efs_tls = tls.compose.service().unwrap().volumes[0].source.strip_prefix(mount_point.as_str()).unwrap().to_string();
    let on_efs_nfs = nfs.compose.volumes[compose::NFS_VOLUME].driver_opts["device"].strip_prefix(':').unwrap().to_string();
    assert_eq!(on_efs_tls, on_efs_nfs);
    assert_eq!(on_efs_nfs, "/data");
}

/// Fault 5: cloud-final has no timeout of its own, so one stalled call hangs the boot forever.
/// Every curl in the boot path has --max-time, the AWS CLI and mount run under `timeout`, and
/// the built-in check fails a boot that loses one.
#[test]
fn every_network_call_of_the_boot_is_bounded_and_the_check_notices_one_that_is_not() {
    for (name, config, region) in configs() {
        for mode in MODES {
            for format in FORMATS {
                let r = render_with(&config, region, mode, format, false);
                let profile = imgbuild::chroma::profile(&imgbuild::chroma::parse_version(&config.chroma.version).unwrap()).unwrap();
                let report = validate::validate(&r, &config, profile, Tools::Off);
                let check = report.checks.iter().find(|c| c.name == "network calls bounded").unwrap();
                assert_eq!(check.status, Status::Pass, "{name} {mode:?} {format:?}: {}", check.detail);
                let boot = &r.scripts.iter().find(|s| s.name == "20-boot.sh").unwrap().text;
                assert!(boot.contains(&format!("readonly deadline=$((SECONDS + {}))", imgbuild::render::BOOT_BUDGET_SECS)));
            }
        }
    }
    let config = Config::default();
    let profile = imgbuild::chroma::profile(&"1.5.9".parse().unwrap()).unwrap();
    for (script, line) in [(0, "  curl -fsS \\\n  \"${imds_endpoint}/x\"\n"), (0, "aws sts get-caller-identity\n"), (1, "mount /mnt/chroma || true\n")] {
        let mut r = render_with(&config, None, Mode::Baked, Format::CloudConfig, false);
        if script == 0 {
            r.scripts[0].text.push_str(line);
        } else {
            r.start.push_str(line);
        }
        let report = validate::validate(&r, &config, profile, Tools::Off);
        let check = report.checks.iter().find(|c| c.name == "network calls bounded").unwrap();
        assert_eq!(check.status, Status::Fail, "{line}: {}", check.detail);
    }
}

#[test]
fn boot_budget_lists_the_guards_and_the_readiness_signal() {
    for (_, config, region) in configs() {
        for mode in MODES {
            let r = render_with(&config, region, mode, Format::Mime, false);
            let steps = r.budget.steps.join("\n");
            assert_eq!(steps.matches("guard: ").count(), 3, "{steps}");
            assert!(steps.contains("signal-resource SUCCESS") && steps.contains("FAILURE"), "{steps}");
            assert!(steps.contains("nofail") && steps.contains("--force-recreate") && steps.contains("writer lock"), "{steps}");
        }
    }
    // What `-v render-userdata` shows.
    let dir = tempfile::tempdir().unwrap();
    let out = imgbuild(dir.path()).args(["-v", "render-userdata", "--no-tools", "--mode", "baked"]).output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    for want in ["guard: /mnt/chroma/data is on the EFS mount", "guard: no chroma.sqlite3 elsewhere", "names no newer Chroma", "signal the stack once"] {
        assert!(err.lines().any(|l| l.starts_with("boot step ") && l.contains(want)), "{want}: {err}");
    }
}

/// The metadata and heartbeat addresses are variables so the boot can run under test; on an
/// instance they must stay instance metadata and this host, or the baked boot could fetch from
/// anywhere.
#[test]
fn the_download_check_holds_the_boot_to_metadata_and_this_host() {
    let config = Config::default();
    let profile = imgbuild::chroma::profile(&"1.5.9".parse().unwrap()).unwrap();
    for (from, to) in [(":-http://169.254.169.254}", ":-http://metadata.example.com}"), (":-http://127.0.0.1:", ":-http://10.0.0.9:")] {
        let mut r = render_with(&config, None, Mode::Baked, Format::CloudConfig, false);
        assert!(r.scripts[0].text.contains(from));
        r.scripts[0].text = r.scripts[0].text.replace(from, to);
        let report = validate::validate(&r, &config, profile, Tools::Off);
        let check = report.checks.iter().find(|c| c.name == "baked boot downloads nothing").unwrap();
        assert_eq!(check.status, Status::Fail, "{to}: {}", check.detail);
    }
}
