//! Render latency, in-process: `cargo bench --bench render`.
//! Whole-process latency (with and without the external validators) is measured with hyperfine;
//! figures and commands are in BENCHMARKS.md.

use criterion::{Criterion, criterion_group, criterion_main};
use imgbuild::check::userdata::{self as validate, Tools};
use imgbuild::config::Config;
use imgbuild::render::{self, Format, Inputs, Mode};

fn bench(c: &mut Criterion) {
    let config = Config::default();
    for (mode, format) in [(Mode::Full, Format::CloudConfig), (Mode::Baked, Format::Mime)] {
        let inputs = Inputs::new(&config, None, mode, format, false).unwrap();
        c.bench_function(&format!("render {}/{}", mode.as_str(), format.as_str()), |b| b.iter(|| render::render(std::hint::black_box(&inputs)).unwrap()));
    }
    let gz = Inputs::new(&config, None, Mode::Full, Format::CloudConfig, true).unwrap();
    c.bench_function("render full/cloud-config + gzip", |b| b.iter(|| render::render(std::hint::black_box(&gz)).unwrap()));
    let inputs = Inputs::new(&config, None, Mode::Full, Format::CloudConfig, false).unwrap();
    c.bench_function("render + built-in checks full/cloud-config", |b| {
        b.iter(|| {
            let r = render::render(&inputs).unwrap();
            validate::validate(&r, &config, inputs.profile, Tools::Off)
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
