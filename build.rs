//! Forwards nginx-sys' view of the nginx build (features, OS, version) as cfgs.

use std::env;
use std::fs;
use std::path::Path;

fn main() {
    println!("cargo::rerun-if-env-changed=DEP_NGINX_FEATURES_CHECK");
    println!(
        "cargo::rustc-check-cfg=cfg(ngx_feature, values({}))",
        env::var("DEP_NGINX_FEATURES_CHECK").unwrap_or_else(|_| "any()".to_string())
    );
    println!("cargo::rerun-if-env-changed=DEP_NGINX_FEATURES");
    if let Ok(features) = env::var("DEP_NGINX_FEATURES") {
        for feature in features.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            println!("cargo::rustc-cfg=ngx_feature=\"{feature}\"");
        }
    }
    println!("cargo::rerun-if-env-changed=DEP_NGINX_OS_CHECK");
    println!(
        "cargo::rustc-check-cfg=cfg(ngx_os, values({}))",
        env::var("DEP_NGINX_OS_CHECK").unwrap_or_else(|_| "any()".to_string())
    );
    println!("cargo::rerun-if-env-changed=DEP_NGINX_OS");
    if let Ok(os) = env::var("DEP_NGINX_OS") {
        println!("cargo::rustc-cfg=ngx_os=\"{os}\"");
    }
    link_nginx_binary();
}

/// `target/<profile>/nginx` -> the nginx binary this module was built against, so
/// that the tests, the demo and the benchmarks run exactly that binary.
fn link_nginx_binary() {
    println!("cargo::rerun-if-env-changed=DEP_NGINX_BUILD_DIR");
    let (Ok(objs), Ok(out)) = (env::var("DEP_NGINX_BUILD_DIR"), env::var("OUT_DIR")) else {
        return;
    };
    let binary = Path::new(&objs).join("nginx");
    // OUT_DIR is target/<profile>/build/<crate>-<hash>/out.
    let Some(profile_dir) = Path::new(&out).ancestors().nth(3) else {
        return;
    };
    let link = profile_dir.join("nginx");
    let _ = fs::remove_file(&link);
    if binary.exists() {
        let _ = std::os::unix::fs::symlink(&binary, &link);
    }
}
