//! The guest devices `boot` attaches a recovered VM's disks on, as its
//! backup recorded them (`disks[i]` of the VM configuration): the bus
//! ([`DiskBus`]), a SCSI disk's controller model ([`scsi_controller`]) and
//! the disk's serial ([`disk_serial`]). Nothing of the configuration's
//! text reaches QEMU's command line but a serial, checked and quoted.

/// The bus a disk is attached on: the one the guest found it on when it was
/// backed up (`bus` of the disk in the VM configuration, which `backup-vms`
/// records from QEMU). A guest booted with its root disk on another bus
/// than its own (Windows, an initramfs without virtio drivers) does not
/// find it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DiskBus {
    /// `virtio-blk-pci`.
    Virtio,
    /// `scsi-hd` on a controller of the model its backup recorded
    /// ([`scsi_controller`]): the VM's `virtio-scsi-pci` (`rfs-scsi0`),
    /// or one of another model (`rfs-scsi1`, ...).
    Scsi,
    /// `ide-hd` on QEMU's default `pc` machine's IDE controller (PIIX):
    /// the VM's IDE disks in order on `ide.0` master and slave, then
    /// `ide.1` (QEMU places no more than two without `bus` and `unit`);
    /// four at most.
    Ide,
    /// An `nvme` controller of its own, serial the disk's or `rfs{i}`
    /// (QEMU requires one).
    Nvme,
}

/// IDE disks [`DiskBus::Ide`] places: two buses of two.
pub(super) const MAX_IDE_DISKS: usize = 4;

impl DiskBus {
    /// Disk `i`'s bus from its entry in a VM configuration's `disks`. None
    /// (a configuration of a backup made before buses were recorded, or
    /// without `disks`) is virtio, as such VMs were always booted; a value
    /// not among the four is virtio too, with a warning (no configuration
    /// text reaches QEMU's command line).
    pub fn from_config(disk: &serde_json::Value, i: usize) -> DiskBus {
        match disk.get("bus") {
            None | Some(serde_json::Value::Null) => DiskBus::Virtio,
            Some(b) => match b.as_str() {
                Some("virtio") => DiskBus::Virtio,
                Some("scsi") => DiskBus::Scsi,
                Some("ide") => DiskBus::Ide,
                Some("nvme") => DiskBus::Nvme,
                _ => {
                    tracing::warn!(
                        "disk {i}: the VM configuration's bus {b} is not one recoverfs boot \
                         attaches (virtio, scsi, ide, nvme): attached as virtio"
                    );
                    DiskBus::Virtio
                }
            },
        }
    }

    /// The `-device` attaching backend `rfs{i}` (see `DiskSource`'s
    /// `backend`) as disk `i`, the `k`th on its bus, first in the boot
    /// order when `i` is 0; a SCSI disk on `scsi_bus`, with its `serial`
    /// if it has one.
    pub(super) fn device(self, i: usize, k: usize, scsi_bus: &str, serial: Option<&str>) -> String {
        let mut d = match self {
            DiskBus::Virtio => format!("virtio-blk-pci,drive=rfs{i},bootindex={i}"),
            DiskBus::Scsi => format!("scsi-hd,drive=rfs{i},bus={scsi_bus},bootindex={i}"),
            DiskBus::Ide => format!(
                "ide-hd,drive=rfs{i},bus=ide.{},unit={},bootindex={i}",
                k / 2,
                k % 2
            ),
            DiskBus::Nvme => {
                let s = serial.map(quote).unwrap_or_else(|| format!("rfs{i}"));
                return format!("nvme,drive=rfs{i},serial={s},bootindex={i}");
            }
        };
        if let Some(s) = serial {
            d.push_str(&format!(",serial={}", quote(s)));
        }
        d
    }
}

/// A comma inside a QEMU option value is written twice.
fn quote(s: &str) -> String {
    s.replace(',', ",,")
}

/// The SCSI controller a recovered VM's SCSI disks go on when their
/// backup recorded none (backups from before models were recorded) and
/// for a model not in [`SCSI_MODELS`]: the VM's `rfs-scsi0`.
pub const VIRTIO_SCSI: &str = "virtio-scsi-pci";

/// The other SCSI controllers `boot` creates as recorded (QEMU 7.2's PCI
/// SCSI host adapters), each with the disks one takes (more disks get
/// another controller of the model). The LSI and ESP adapters take 7:
/// QEMU gives `scsi-hd` target 7 too, but that is the adapter's own ID,
/// which guest drivers do not scan (review26 L1).
const SCSI_MODELS: [(&str, usize); 8] = [
    ("lsi53c895a", 7),
    ("lsi53c810", 7),
    ("am53c974", 7),
    ("dc390", 7),
    ("mptsas1068", 8),
    ("megasas", 64),
    ("megasas-gen2", 64),
    ("pvscsi", 64),
];

/// The controller model `boot` creates for a SCSI disk whose guest
/// device's controller was `model` (as `backup-vms` records it): itself if
/// `boot` knows it (the virtio variants are [`VIRTIO_SCSI`]), else `None`.
pub fn known_scsi_controller(model: &str) -> Option<&'static str> {
    match model {
        "virtio-scsi-pci"
        | "virtio-scsi"
        | "virtio-scsi-pci-transitional"
        | "virtio-scsi-pci-non-transitional" => Some(VIRTIO_SCSI),
        "lsi" => Some("lsi53c895a"),
        m => SCSI_MODELS.iter().map(|(n, _)| *n).find(|n| *n == m),
    }
}

/// How many disks one controller of `model` (from [`scsi_controller`])
/// takes; unbounded for virtio-scsi.
pub(super) fn scsi_capacity(model: &str) -> usize {
    (SCSI_MODELS.iter().find(|(n, _)| *n == model)).map_or(usize::MAX, |(_, c)| *c)
}

/// The SCSI controller model disk `i` goes on, from `controller` of its
/// entry in a VM configuration's `disks`: none (backups from before models
/// were recorded) is [`VIRTIO_SCSI`], as such disks were always attached;
/// so is a model `boot` does not know ([`known_scsi_controller`]), with a
/// warning naming it.
pub fn scsi_controller(disk: &serde_json::Value, i: usize) -> &'static str {
    let m = match disk.get("controller") {
        None | Some(serde_json::Value::Null) => return VIRTIO_SCSI,
        Some(m) => m,
    };
    if let Some(k) = m.as_str().and_then(known_scsi_controller) {
        return k;
    }
    tracing::warn!(
        "disk {i}: the VM configuration's SCSI controller {m} is not one recoverfs boot \
         creates ({VIRTIO_SCSI}, {}): attached on {VIRTIO_SCSI}; a guest without its \
         driver does not see the disk",
        SCSI_MODELS.map(|(n, _)| n).join(", ")
    );
    VIRTIO_SCSI
}

/// The longest serial `boot` passes on (QEMU keeps 20 bytes of an IDE,
/// virtio or NVMe disk's, 36 of a SCSI disk's).
const MAX_SERIAL: usize = 64;

/// Disk `i`'s serial from `serial` of its entry in a VM configuration's
/// `disks`, which `boot` gives its device (so `/dev/disk/by-id` names and
/// Windows' disk identities stay): none when not recorded (older
/// backups, a disk without one); printable ASCII of at most 64 bytes
/// only, else none with a warning.
pub fn disk_serial(disk: &serde_json::Value, i: usize) -> Option<String> {
    let s = disk.get("serial").filter(|s| !s.is_null())?;
    match s.as_str() {
        Some(t)
            if !t.is_empty()
                && t.len() <= MAX_SERIAL
                && t.bytes().all(|b| (0x20..0x7f).contains(&b)) =>
        {
            Some(t.to_string())
        }
        _ => {
            tracing::warn!(
                "disk {i}: the VM configuration's serial {s} is not printable ASCII of 1 to \
                 {MAX_SERIAL} bytes: the disk is attached without a serial"
            );
            None
        }
    }
}
