//! Packaging: an installation of an earlier release, updated with `ALTER EXTENSION ... UPDATE`,
//! has exactly the objects, signatures, comments and grants of a fresh install of this one.

use std::collections::BTreeSet;
use std::path::PathBuf;

use redis_pg_sync_e2e::*;

/// Every member of the extension with what users and pg_dump see of it: a function's
/// arguments (names, defaults), result, volatility, parallel safety, strictness, security,
/// C symbol and ACL; a relation's ACL; every object's comment; the initial privileges that
/// pg_dump restores. One line per object, sorted.
const CATALOG: &str = r#"
WITH ext AS (SELECT oid FROM pg_extension WHERE extname = 'redis_pg_sync')
SELECT pg_describe_object(d.classid, d.objid, d.objsubid)
    || coalesce(' | args: ' || pg_get_function_arguments(p.oid)
        || ' | returns: ' || pg_get_function_result(p.oid)
        || ' | ' || p.provolatile::text || p.proparallel::text
        || ' strict=' || p.proisstrict || ' definer=' || p.prosecdef
        || ' | ' || p.prosrc || ' ' || coalesce(p.probin, '')
        || ' | config: ' || coalesce(p.proconfig::text, '')
        || ' | acl: ' || coalesce(p.proacl::text, 'default'), '')
    || CASE WHEN c.oid IS NULL THEN '' ELSE ' | acl: ' || coalesce(c.relacl::text, 'default') END
    || ' | comment: ' || coalesce(obj_description(d.objid, d.classid::regclass::name), '')
    || ' | initial privileges: ' || coalesce((
        SELECT string_agg(i.initprivs::text, ',') FROM pg_init_privs i
        WHERE i.classoid = d.classid AND i.objoid = d.objid), '')
FROM pg_depend d
LEFT JOIN pg_proc p ON d.classid = 'pg_proc'::regclass AND p.oid = d.objid
LEFT JOIN pg_class c ON d.classid = 'pg_class'::regclass AND c.oid = d.objid
WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e'
  AND d.refobjid = (SELECT oid FROM ext)
UNION ALL
SELECT 'extension redis_pg_sync ' || extversion || ' relocatable=' || extrelocatable
    || ' config=' || coalesce(extconfig::regclass[]::text, '')
FROM pg_extension WHERE extname = 'redis_pg_sync'
"#;

fn catalog(pg: &Cluster, db: &str) -> BTreeSet<String> {
    pg.client_of(db)
        .query(CATALOG, &[])
        .unwrap_or_else(|e| panic!("catalog query: {e}"))
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect()
}

/// The frozen install scripts of earlier releases (`sql/redis_pg_sync--X.sql`) are kept in
/// the source tree, not installed: copied beside the installed scripts for this test.
fn install_earlier_release(version: &str) {
    let name = format!("redis_pg_sync--{version}.sql");
    let frozen = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../sql").join(&name);
    let target = pg_sharedir().join("extension").join(&name);
    std::fs::copy(&frozen, &target)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", frozen.display(), target.display()));
}

/// The version of the extension being built (the root package's, which the control file's
/// `default_version` takes).
fn extension_version() -> String {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let text = std::fs::read_to_string(&manifest).expect("read Cargo.toml");
    text.lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .expect("the package version in Cargo.toml")
        .to_owned()
}

#[test]
fn an_update_from_0_1_0_equals_a_fresh_install() {
    install_earlier_release("0.1.0");
    let pg = Cluster::start_with(ClusterOptions {
        preload: true,
        no_extension: true,
        ..Default::default()
    });
    pg.execute("CREATE DATABASE fresh");
    pg.execute("CREATE DATABASE updated");
    pg.client_of("fresh").batch_execute("CREATE EXTENSION redis_pg_sync").expect("fresh install");
    let mut updated = pg.client_of("updated");
    updated.batch_execute("CREATE EXTENSION redis_pg_sync VERSION '0.1.0'").expect("install 0.1.0");
    let old = catalog(&pg, "updated");
    assert!(old.iter().any(|l| l.starts_with("extension redis_pg_sync 0.1.0 ")), "{old:#?}");
    updated.batch_execute("ALTER EXTENSION redis_pg_sync UPDATE").expect("update");

    let (fresh, updated) = (catalog(&pg, "fresh"), catalog(&pg, "updated"));
    let version = extension_version();
    assert!(
        fresh.iter().any(|l| l.starts_with(&format!("extension redis_pg_sync {version} "))),
        "the fresh install is not {version}: {fresh:#?}"
    );
    // Every function of the SQL API is there, with its comment.
    let functions: Vec<&String> = fresh.iter().filter(|l| l.starts_with("function ")).collect();
    assert!(functions.len() >= 7, "{functions:#?}");
    let uncommented: Vec<&&String> =
        functions.iter().filter(|l| l.contains(" | comment:  | ")).collect();
    assert!(uncommented.is_empty(), "functions without a comment: {uncommented:#?}");
    let only_fresh: Vec<&String> = fresh.difference(&updated).collect();
    let only_updated: Vec<&String> = updated.difference(&fresh).collect();
    assert!(
        only_fresh.is_empty() && only_updated.is_empty(),
        "the update differs from a fresh install\nonly in the fresh install:\n{only_fresh:#?}\nonly after the update:\n{only_updated:#?}"
    );
    assert_ne!(old, fresh, "0.1.0 and {version} should differ (the update did something)");
}
