//! bake against a moto server: base image resolution and recording, the digest-tag cache (a hit
//! launches nothing: moto cannot run automation executions and would fail the bake if one
//! started), the handoff to deploy, document registration and versions, list and prune.

use aws_config::BehaviorVersion;
use imgbuild::bake::{self, DocumentChange};

use crate::services;
use crate::support::{moto_cmd as cmd, rt};

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/moto-stack.yaml");

async fn conf(url: &str) -> aws_config::SdkConfig {
    crate::support::moto_sdk(url, "us-east-1").await
}

fn project(name: &str) -> tempfile::TempDir {
    crate::support::moto_project(name, "")
}

fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// An image of ours in moto, made the way the bake makes one, with the given tags.
fn make_image(url: &str, tags: &[(&str, &str)]) -> String {
    rt().block_on(async {
        let c = conf(url).await;
        let ssm = aws_sdk_ssm::Client::new(&c);
        let ec2 = aws_sdk_ec2::Client::new(&c);
        let base = ssm.get_parameter().name("/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64").send().await.unwrap();
        let base = base.parameter().unwrap().value().unwrap().to_string();
        let run = ec2.run_instances().image_id(&base).min_count(1).max_count(1).send().await.unwrap();
        let instance = run.instances()[0].instance_id().unwrap().to_string();
        let name = format!("imgbuild-test-{}", imgbuild::cmd::run_token());
        let ami = ec2.create_image().instance_id(&instance).name(name).send().await.unwrap().image_id().unwrap().to_string();
        ec2.terminate_instances().instance_ids(&instance).send().await.unwrap();
        let mut req = ec2.create_tags().resources(&ami);
        for (k, v) in tags {
            req = req.tags(aws_sdk_ec2::types::Tag::builder().key(*k).value(*v).build());
        }
        req.send().await.unwrap();
        ami
    })
}

fn parameter(url: &str, name: &str) -> Option<String> {
    rt().block_on(async {
        let ssm = aws_sdk_ssm::Client::new(&conf(url).await);
        ssm.get_parameter().name(name).send().await.ok().and_then(|o| o.parameter().and_then(|p| p.value()).map(String::from))
    })
}

#[test]
fn a_cache_hit_reuses_the_image_hands_it_over_and_deploy_boots_it() {
    let Some(moto) = services::moto() else { return };
    let url = &moto.url;
    let dir = project("cached");

    // The plan first: base from the public parameter, a digest, nothing cached yet.
    let plan = json_of(&cmd(dir.path(), url).args(["--output", "json", "bake", "--dry-run", "--no-tools"]).output().unwrap());
    let digest = plan["digest"].as_str().unwrap().to_string();
    assert!(digest.starts_with("sha256:") && digest.len() == 71, "{digest}");
    assert!(plan["cached"].is_null());
    assert!(plan["base_from"].as_str().unwrap().contains("public AL2023 parameter"));
    assert!(plan["document"].as_str().unwrap().contains("base64 -d > /root/imgbuild-bake.sh && bash /root/imgbuild-bake.sh"));
    assert!(parameter(url, "/imgbuild/cached/ami").is_none(), "a dry run changes nothing");

    // The same inputs give the same digest.
    let again = json_of(&cmd(dir.path(), url).args(["--output", "json", "bake", "--dry-run", "--no-tools"]).output().unwrap());
    assert_eq!(again["digest"], plan["digest"]);

    // Another project's image with the same digest is not this project's cache: it is not
    // this project's to protect from its own prune.
    make_image(url, &[("imgbuild:digest", &digest), ("imgbuild:project", "someone-else"), ("imgbuild:chroma-version", "1.5.9")]);
    let still = json_of(&cmd(dir.path(), url).args(["--output", "json", "bake", "--dry-run", "--no-tools"]).output().unwrap());
    assert!(still["cached"].is_null(), "{still}");

    let ami = make_image(
        url,
        &[
            ("imgbuild:digest", &digest),
            ("imgbuild:project", "cached"),
            ("imgbuild:chroma-version", "1.5.9"),
            ("imgbuild:chroma-image", "ghcr.io/chroma-core/chroma:1.5.9"),
        ],
    );
    let done = json_of(&cmd(dir.path(), url).args(["--output", "json", "bake", "--no-tools"]).output().unwrap());
    assert_eq!(done["ami"], ami.as_str());
    assert_eq!(done["cached"], true);
    assert_eq!(parameter(url, "/imgbuild/cached/ami").as_deref(), Some(ami.as_str()));
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("imgbuild.bake.json")).unwrap()).unwrap();
    assert_eq!(manifest["ami"], ami.as_str());
    assert_eq!(manifest["digest"], digest.as_str());
    assert_eq!(manifest["base_ami"], plan["base_ami"]);
    assert_eq!(manifest["cached"], true);
    assert_eq!(manifest["region"], "us-east-1");

    // --regions: the image is copied and handed over there too; a second run finds the copy.
    let copied = json_of(&cmd(dir.path(), url).args(["--output", "json", "bake", "--no-tools", "--regions", "eu-west-1"]).output().unwrap());
    let copy = copied["manifest"]["copies"]["eu-west-1"].as_str().unwrap().to_string();
    assert!(copy.starts_with("ami-") && copy != ami, "{copied}");
    let in_eu = rt().block_on(async {
        let c = aws_config::defaults(BehaviorVersion::latest())
            .endpoint_url(url.as_str())
            .region(aws_config::Region::new("eu-west-1"))
            .credentials_provider(aws_sdk_ec2::config::Credentials::new("testing", "testing", None, None, "tests"))
            .load()
            .await;
        let ssm = aws_sdk_ssm::Client::new(&c);
        ssm.get_parameter().name("/imgbuild/cached/ami").send().await.unwrap().parameter().unwrap().value().unwrap().to_string()
    });
    assert_eq!(in_eu, copy);
    let again = json_of(&cmd(dir.path(), url).args(["--output", "json", "bake", "--no-tools", "--regions", "eu-west-1"]).output().unwrap());
    assert_eq!(again["manifest"]["copies"]["eu-west-1"], copy.as_str(), "the copy is found again, not made twice");

    // `bake && deploy`: deploy picks the handed-over image in baked mode.
    let out = cmd(dir.path(), url).args(["--output", "json", "deploy", "--no-execute", "--no-tools", "--template", FIXTURE]).output().unwrap();
    let doc = json_of(&out);
    assert_eq!(doc["ami"]["ami"], ami.as_str());
    assert_eq!(doc["ami"]["mode"], "baked");
    assert_eq!(doc["ami"]["source"]["parameter"], "/imgbuild/cached/ami");
}

#[test]
fn the_base_image_is_recorded_and_moves_only_with_update_base() {
    let Some(moto) = services::moto() else { return };
    let url = &moto.url;
    let dir = project("based");
    let fresh = json_of(&cmd(dir.path(), url).args(["--output", "json", "bake", "--dry-run", "--no-tools"]).output().unwrap());
    let public = fresh["base_ami"].as_str().unwrap().to_string();
    // A manifest from an earlier bake recorded another base: it is kept, and it changes the digest.
    let recorded = "ami-0123456789abcdef0";
    let manifest = serde_json::json!({
        "name": "based", "region": "us-east-1", "ami": "ami-00000000000000000", "digest": "sha256:0", "base_ami": recorded,
        "arch": "x86_64", "chroma_version": "1.5.9", "image": "ghcr.io/chroma-core/chroma:1.5.9", "time": 0, "cached": false
    });
    std::fs::write(dir.path().join("imgbuild.bake.json"), manifest.to_string()).unwrap();
    let kept = json_of(&cmd(dir.path(), url).args(["--output", "json", "bake", "--dry-run", "--no-tools"]).output().unwrap());
    assert_eq!(kept["base_ami"], recorded);
    assert!(kept["base_from"].as_str().unwrap().contains("recorded in the manifest"));
    assert_ne!(kept["digest"], fresh["digest"], "the base image is part of the recipe");
    let moved = json_of(&cmd(dir.path(), url).args(["--output", "json", "bake", "--dry-run", "--no-tools", "--update-base"]).output().unwrap());
    assert_eq!(moved["base_ami"], public.as_str());
    assert_eq!(moved["digest"], fresh["digest"]);
    // A pinned base wins over both.
    std::fs::write(dir.path().join("imgbuild.yaml"), "name: based\nregion: us-east-1\nbake:\n  base_ami: ami-0fedcba9876543210\n").unwrap();
    let pinned = json_of(&cmd(dir.path(), url).args(["--output", "json", "bake", "--dry-run", "--no-tools", "--update-base"]).output().unwrap());
    assert_eq!(pinned["base_ami"], "ami-0fedcba9876543210");
}

#[test]
fn the_document_gets_a_new_version_only_when_its_content_changes() {
    let Some(moto) = services::moto() else { return };
    rt().block_on(async {
        let clients = imgbuild::aws::Clients::from_conf(&conf(&moto.url).await);
        let config = imgbuild::config::Config::default();
        let profile = imgbuild::chroma::profile(&imgbuild::chroma::parse_version("1.5.9").unwrap()).unwrap();
        let (script, _) = bake::bake_script(&config, profile).unwrap();
        let doc = bake::document(&script).unwrap();
        let name = format!("imgbuild-doctest-{}", imgbuild::cmd::run_token());
        assert_eq!(bake::ensure_document(&clients, &name, &doc, "doctest").await.unwrap(), (DocumentChange::Created, "1".to_string()));
        assert_eq!(bake::ensure_document(&clients, &name, &doc, "doctest").await.unwrap(), (DocumentChange::Unchanged, "1".to_string()));
        // A change of meaning (a comment alone is the same document to SSM, tested below).
        let mut value: serde_yaml::Value = serde_yaml::from_str(&doc).unwrap();
        value["description"] = serde_yaml::Value::String("Changed.".into());
        let changed = serde_yaml::to_string(&value).unwrap();
        assert_eq!(bake::ensure_document(&clients, &name, &changed, "doctest").await.unwrap(), (DocumentChange::Updated, "2".to_string()));
        let got = clients.ssm.get_document().name(&name).send().await.unwrap();
        assert_eq!(got.document_version(), Some("2"));
        let stored: serde_yaml::Value = serde_yaml::from_str(got.content().unwrap()).unwrap();
        assert_eq!(stored, value, "the stored document is the changed one");
        assert_eq!(bake::ensure_document(&clients, &name, &changed, "doctest").await.unwrap().0, DocumentChange::Unchanged);
        let commented = format!("{changed}# a comment\n");
        assert_eq!(bake::ensure_document(&clients, &name, &commented, "doctest").await.unwrap(), (DocumentChange::Unchanged, "2".to_string()));
    });
}

#[test]
fn prune_keeps_the_newest_and_everything_in_use() {
    let Some(moto) = services::moto() else { return };
    let url = &moto.url;
    let dir = project("pruned");
    let tags = [("imgbuild:project", "pruned")];
    let images: Vec<String> = (0..4)
        .map(|_| {
            let ami = make_image(url, &tags);
            std::thread::sleep(std::time::Duration::from_millis(1100)); // distinct creation times
            ami
        })
        .collect();
    let (oldest, second, third, newest) = (&images[0], &images[1], &images[2], &images[3]);
    // The oldest is what a deployed launch template boots; the second is handed over to deploy.
    rt().block_on(async {
        let c = conf(url).await;
        let ec2 = aws_sdk_ec2::Client::new(&c);
        ec2.create_launch_template()
            .launch_template_name(format!("pruned-{}", imgbuild::cmd::run_token()))
            .launch_template_data(aws_sdk_ec2::types::RequestLaunchTemplateData::builder().image_id(oldest).build())
            .tag_specifications(
                aws_sdk_ec2::types::TagSpecification::builder()
                    .resource_type(aws_sdk_ec2::types::ResourceType::LaunchTemplate)
                    .tags(aws_sdk_ec2::types::Tag::builder().key("imgbuild:project").value("pruned").build())
                    .build(),
            )
            .send()
            .await
            .unwrap();
        aws_sdk_ssm::Client::new(&c)
            .put_parameter()
            .name("/imgbuild/pruned/ami")
            .value(second)
            .r#type(aws_sdk_ssm::types::ParameterType::String)
            .overwrite(true)
            .send()
            .await
            .unwrap();
    });

    let list = json_of(&cmd(dir.path(), url).args(["--output", "json", "images", "list"]).output().unwrap());
    let rows = list["images"].as_array().unwrap();
    let ids: Vec<&str> = rows.iter().map(|r| r["ami"].as_str().unwrap()).collect();
    assert_eq!(ids, [newest.as_str(), third.as_str(), second.as_str(), oldest.as_str()], "newest first");
    let in_use = |ami: &str| rows.iter().find(|r| r["ami"] == ami).unwrap()["in_use"].as_array().unwrap().len();
    assert_eq!((in_use(oldest), in_use(second), in_use(third), in_use(newest)), (1, 1, 0, 0));

    let dry = json_of(&cmd(dir.path(), url).args(["--output", "json", "images", "prune", "--keep", "1", "--dry-run"]).output().unwrap());
    let would: Vec<&str> = dry["would_prune"].as_array().unwrap().iter().map(|r| r["ami"].as_str().unwrap()).collect();
    assert_eq!(would, [third.as_str()]);
    // Without a terminal and without --yes it refuses, pruning nothing, and names its own flags.
    let refused = cmd(dir.path(), url).args(["images", "prune", "--keep", "1"]).output().unwrap();
    assert_eq!(refused.status.code(), Some(2));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("--yes") && !said.contains("--no-execute"), "prune has no --no-execute: {said}");

    let done = json_of(&cmd(dir.path(), url).args(["--output", "json", "images", "prune", "--keep", "1", "--yes"]).output().unwrap());
    let pruned: Vec<&str> = done["pruned"].as_array().unwrap().iter().map(|r| r["ami"].as_str().unwrap()).collect();
    assert_eq!(pruned, [third.as_str()]);
    // One shape, dry run or not (README, "Machine-readable output").
    for doc in [&dry, &done] {
        for key in ["dry_run", "pruned", "would_prune", "kept_in_use"] {
            assert!(!doc[key].is_null(), "{key} missing from {doc}");
        }
    }
    assert_eq!((dry["dry_run"].as_bool(), done["dry_run"].as_bool(), done["kept_in_use"].as_u64()), (Some(true), Some(false), Some(2)));
    let left = json_of(&cmd(dir.path(), url).args(["--output", "json", "images", "list"]).output().unwrap());
    let left: Vec<&str> = left["images"].as_array().unwrap().iter().map(|r| r["ami"].as_str().unwrap()).collect();
    assert_eq!(left, [newest.as_str(), second.as_str(), oldest.as_str()]);
    let snaps = done["pruned"][0]["snapshots"].as_array().unwrap().clone();
    rt().block_on(async {
        let ec2 = aws_sdk_ec2::Client::new(&conf(url).await);
        for s in snaps {
            let s = s.as_str().unwrap();
            assert!(ec2.describe_snapshots().snapshot_ids(s).send().await.is_err(), "snapshot {s} deleted");
        }
    });
}
