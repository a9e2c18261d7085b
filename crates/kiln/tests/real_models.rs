//! The five real models of the foundation issue, built and run through the library API and
//! compared with ONNX Runtime's outputs (rel L2 ≤ 1e-4, same argmax for classifiers).

mod common;

use kiln::{parse_shapes, Builder, BuilderConfig, Runtime};

const TOLERANCE: f64 = 1e-4;
const CLASSIFIERS: &[&str] = &["orientation_b1", "orientation_b4", "ppocr_cls_b6"];

fn check_case(name: &str, specialise: bool) {
    let Some(assets) = common::assets() else {
        return;
    };
    let case = common::case(&assets, name);
    let config = BuilderConfig {
        shapes: if specialise {
            parse_shapes(&case.shapes).expect("shapes")
        } else {
            Default::default()
        },
        ..Default::default()
    };
    let engine = Builder::new()
        .build_onnx_file(&case.model, &config)
        .expect("build");
    // Round-trip through a plan file.
    let dir = std::env::temp_dir().join(format!(
        "kiln-test-{}-{name}-{specialise}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let plan = dir.join("model.plan");
    engine.save(&plan).expect("save plan");
    let engine = Runtime::load(&plan).expect("load plan");
    let mut ctx = engine.create_context();
    let outputs = ctx.execute(&common::named(&case.inputs)).expect("execute");
    assert_eq!(outputs.len(), case.outputs.len());
    for (info, got) in engine.outputs().iter().zip(&outputs) {
        let got = got.as_tensor().expect("tensor output");
        let (_, want) = case
            .outputs
            .iter()
            .find(|(n, _)| *n == info.name)
            .expect("reference output");
        assert_eq!(
            got.shape(),
            want.shape(),
            "{name}: output {} shape",
            info.name
        );
        let err = common::rel_l2(got, want);
        eprintln!(
            "{name} (specialised: {specialise}) {}: rel L2 {err:.3e}",
            info.name
        );
        assert!(
            err <= TOLERANCE,
            "{name}: output {} rel L2 {err:e} > {TOLERANCE:e}",
            info.name
        );
        if CLASSIFIERS.contains(&name) {
            assert_eq!(
                common::argmax_rows(got),
                common::argmax_rows(want),
                "{name}: argmax differs"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

macro_rules! real_case {
    ($($test:ident => $case:expr),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                check_case($case, false);
                check_case($case, true);
            }
        )*
    };
}

real_case! {
    orientation_b1 => "orientation_b1",
    orientation_b4 => "orientation_b4",
    ppocr_det_640 => "ppocr_det_640",
    ppocr_det_480x800 => "ppocr_det_480x800",
    ppocr_cls_b6 => "ppocr_cls_b6",
    silero_op15 => "silero_op15",
    silero_sequence => "silero_sequence",
}
