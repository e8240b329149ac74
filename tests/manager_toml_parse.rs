//! The TOML reader: one parser behind both entry points, errors that say
//! what was expected, unreadable files named, relative disk paths taken
//! from the file's folder, and configurations that survive a round trip.
#![cfg(feature = "config")]

use std::sync::Arc;

use vmio::GuestRam;
use vmio::testing::RecordingController;
use vmio::{
    ConfigErrorKind, DeviceConfig, DeviceManager, ParamValue, Space, VirtioBlkMmio, VmDeviceConfig,
};

const DEVICE: &str = "[[devices]]\nname = 'd'\nkind = 'reserved'\nbase = 0x1000\nlength = 8\n";

/// Inputs the two entry points once disagreed on, and ordinary ones.
const CORPUS: &[&str] = &[
    DEVICE,
    // A kind parameter written outside `params`.
    "[[devices]]\nname = 'd'\nkind = 'reserved'\nbase = 0x1000\nlength = 8\nvalue = 0\n",
    // An address as a string, above i64::MAX.
    "[[devices]]\nname = 'd'\nkind = 'k'\nbase = '0xffff_ffff_ffff_f000'\nlength = 0x1000\n",
    // A negative parameter, a float parameter, a nested table.
    "[[devices]]\nname = 'd'\nkind = 'k'\nbase = 0\nlength = 1\nparams = { v = -1 }\n",
    "[[devices]]\nname = 'd'\nkind = 'k'\nbase = 0\nlength = 1\nparams = { v = 1.5 }\n",
    "[[devices]]\nname = 'd'\nkind = 'k'\nbase = 0\nlength = 1\nparams = { v = { w = 1 } }\n",
    // An empty name, a missing name, an irq above 32 bits.
    "[[devices]]\nname = ''\nkind = 'k'\nbase = 0\nlength = 1\n",
    "[[devices]]\nkind = 'k'\nbase = 0\nlength = 1\n",
    "[[devices]]\nname = 'd'\nkind = 'k'\nbase = 0\nlength = 1\nirq = 0x1_0000_0000\n",
    // A top-level key other than `devices`; no devices at all.
    "machine = 'pc'\n",
    "",
    // Every value type, and the space spelled `port`.
    "[[devices]]\nname = 'd'\nkind = 'k'\nbase = 0\nlength = 1\nirq = 3\n\
     params = { a = true, b = 5, c = 'x', space = 'port' }\n",
];

#[test]
fn serde_and_from_toml_accept_and_refuse_the_same_inputs() {
    for text in CORPUS {
        let ours = VmDeviceConfig::from_toml(text);
        let serde = toml::from_str::<VmDeviceConfig>(text);
        match (&ours, &serde) {
            (Ok(a), Ok(b)) => assert_eq!(a, b, "{text}"),
            (Err(a), Err(b)) => {
                assert!(b.to_string().contains(&a.to_string()), "{text}: {a} vs {b}")
            }
            _ => panic!("{text}: from_toml {ours:?}, serde {serde:?}"),
        }
    }
}

#[test]
fn unknown_keys_say_which_keys_are_expected() {
    let text = format!("{DEVICE}irqq = 4\n");
    let e = VmDeviceConfig::from_toml(&text).unwrap_err();
    assert_eq!((e.device.as_str(), e.field.as_str()), ("d", "irqq"));
    let ConfigErrorKind::UnknownParam { expected } = &e.kind else { panic!("{e}") };
    assert!(expected.starts_with("name, kind, base, length, irq, params"), "{expected}");
    assert!(e.to_string().contains("kind parameters go inside `params`"), "{e}");

    let e = VmDeviceConfig::from_toml("[[device]]\nname = 'd'\n").unwrap_err();
    assert_eq!((e.device.as_str(), e.field.as_str()), ("<toml>", "device"));
    assert!(e.to_string().contains("expected one of: devices"), "{e}");

    // A parameter the kind does not take: the kind's own list.
    let text = format!("{DEVICE}params = {{ valeu = 0 }}\n");
    let vm = VmDeviceConfig::from_toml(&text).unwrap();
    let Err(vmio::ManagerError::Config(e)) = DeviceManager::from_config(&vm) else { panic!() };
    assert_eq!(e.field, "params.valeu");
    assert_eq!(e.kind, ConfigErrorKind::UnknownParam { expected: "space, value".into() });
    assert!(e.to_string().ends_with("unknown key; expected one of: space, value"), "{e}");
}

#[test]
fn a_syntax_error_in_a_file_names_the_file() {
    let dir = scratch("syntax");
    let path = dir.join("vm.toml");
    std::fs::write(&path, "[[devices]\n").unwrap();
    let e = VmDeviceConfig::from_toml_file(&path).unwrap_err();
    assert_eq!((e.device.as_str(), e.field.as_str()), (path.to_str().unwrap(), "syntax"));
    std::fs::remove_dir_all(dir).unwrap();
}

fn scratch(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("vmio-toml-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn relative_disk_paths_resolve_against_the_toml_files_folder() {
    let dir = scratch("paths");
    std::fs::create_dir_all(dir.join("images")).unwrap();
    std::fs::write(dir.join("images/disk.img"), vec![0u8; 4096]).unwrap();
    let absolute = dir.join("images/disk.img");
    let text = format!(
        "[[devices]]\nname = 'rel'\nkind = 'virtio-blk'\nbase = 0x1000_1000\nlength = 0x200\n\
         irq = 33\nparams = {{ path = 'images/disk.img' }}\n\
         [[devices]]\nname = 'abs'\nkind = 'virtio-blk'\nbase = 0x1000_2000\nlength = 0x200\n\
         irq = 34\nparams = {{ path = '{}' }}\n",
        absolute.display()
    );
    std::fs::write(dir.join("vm.toml"), text).unwrap();

    // Loaded from elsewhere: the working directory plays no part.
    let vm = VmDeviceConfig::from_toml_file(dir.join("vm.toml")).unwrap();
    let want = ParamValue::Str(dir.join("images/disk.img").to_string_lossy().into_owned());
    assert_eq!(vm.devices[0].param("path"), Some(&want));
    let abs = ParamValue::Str(absolute.to_string_lossy().into_owned());
    assert_eq!(vm.devices[1].param("path"), Some(&abs));

    let m = DeviceManager::builder()
        .memory(Arc::new(GuestRam::new(0x8000_0000, 1 << 20).unwrap()))
        .interrupts(Arc::new(RecordingController::new()))
        .build(&vm)
        .unwrap();
    assert!(m.device::<VirtioBlkMmio>("rel").is_some());
    // `from_toml` has no folder: the text is taken as it is.
    let vm = VmDeviceConfig::from_toml(&std::fs::read_to_string(dir.join("vm.toml")).unwrap());
    assert_eq!(vm.unwrap().devices[0].param("path"), Some(&"images/disk.img".into()));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn configurations_round_trip_through_toml() {
    let vm = VmDeviceConfig::new(vec![
        DeviceConfig::new("top", "reserved", 0xffff_ffff_ffff_f000, 0x1000),
        DeviceConfig::new("com1", "uart16550", 0x3f8, 8)
            .with_irq(4)
            .with_param("space", "pio")
            .with_param("reg_shift", 0u64)
            .with_param("fifo", true),
    ]);
    let text = toml::to_string(&vm).unwrap();
    assert_eq!(VmDeviceConfig::from_toml(&text).unwrap(), vm, "{text}");
    // The space as a parameter value and as a serde value agree.
    let space: Space = toml::Value::String("port".into()).try_into().unwrap();
    assert_eq!(space, Space::Pio);
    let one: DeviceConfig = toml::from_str(&toml::to_string(&vm.devices[1]).unwrap()).unwrap();
    assert_eq!(one, vm.devices[1]);
}
