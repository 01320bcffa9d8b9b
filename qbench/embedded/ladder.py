"""qbench's own ladder of embedded targets, registered through the public device hook.

Each rung is a real, buyable part; RAM and storage are the datasheet figures. RAM is the whole
part's memory: no allowance is subtracted for an RTOS or Linux, so "fits" is a lower bound on
what a deployment needs, never an overstatement of what the part has.

The default for `qbench run` is `pi-zero-2w`: it is the smallest rung where whisper-tiny.en
runs with this harness at all. With float32 activations the cross-attention keys/values alone
are 4 layers x 2 x 1500 x 384 x 4 B = 18.4 MB and one encoder MLP hidden state is 9.2 MB, so no
microcontroller rung (1-8 MB of RAM, even with 8 MB PSRAM) can hold one 30 s window, however
few bits the weights have; `qbench fit` shows this per device.
"""

from __future__ import annotations

from qbench.embedded.profile import DeviceProfile
from qbench.hookspecs import hookimpl

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

BUILTIN_DEVICES: tuple[DeviceProfile, ...] = (
    DeviceProfile(
        name="stm32h743",
        ram_bytes=1 * MiB,
        storage_bytes=2 * MiB,
        weights_execute_in_place=True,
        part="STMicroelectronics STM32H743ZI (Cortex-M7, 480 MHz)",
        note="DS12110: 1 MB SRAM total (incl. TCM), 2 MB dual-bank embedded flash, memory-mapped (XIP)",
    ),
    DeviceProfile(
        name="imxrt1170",
        ram_bytes=2 * MiB,
        storage_bytes=16 * MiB,
        weights_execute_in_place=True,
        part="NXP i.MX RT1170 (MIMXRT1176, Cortex-M7 1 GHz + M4) on MIMXRT1170-EVK",
        note="IMXRT1170CEC: 2 MB on-chip SRAM; the EVK's 16 MB QSPI NOR flash (IS25WP128) via FlexSPI XIP; "
        "the EVK's 64 MB SDRAM is not counted (a crossover MCU design without external RAM)",
    ),
    DeviceProfile(
        name="esp32-s3",
        ram_bytes=8 * MiB + 512 * KiB,
        storage_bytes=16 * MiB,
        weights_execute_in_place=True,
        part="Espressif ESP32-S3-WROOM-1-N16R8 (Xtensa LX7 dual core, 240 MHz)",
        note="ESP32-S3-WROOM-1 datasheet: 16 MB quad SPI flash, 8 MB octal PSRAM, plus the chip's 512 KB SRAM; "
        "flash is memory-mapped through the MMU/cache, so read-only weights execute in place",
    ),
    DeviceProfile(
        name="pi-zero-2w",
        ram_bytes=512 * MiB,
        storage_bytes=32 * GiB,
        part="Raspberry Pi Zero 2 W (RP3A0, quad Cortex-A53 1 GHz)",
        note="Raspberry Pi Zero 2 W product brief: 512 MB LPDDR2; storage is a microSD card (32 GB assumed); "
        "weights are loaded into RAM (no XIP from SD)",
    ),
    DeviceProfile(
        name="pi4-2gb",
        ram_bytes=2 * GiB,
        storage_bytes=32 * GiB,
        part="Raspberry Pi 4 Model B 2 GB (BCM2711, quad Cortex-A72 1.5 GHz)",
        note="Raspberry Pi 4 Model B product brief: 2 GB LPDDR4-3200; microSD storage (32 GB assumed)",
    ),
    DeviceProfile(
        name="jetson-nano-4gb",
        ram_bytes=4 * GiB,
        storage_bytes=16 * GiB,
        part="NVIDIA Jetson Nano module 4 GB (quad Cortex-A57, 128-core Maxwell GPU)",
        note="Jetson Nano module datasheet DA-09366: 4 GB 64-bit LPDDR4 shared by CPU and GPU, 16 GB eMMC 5.1",
    ),
)


@hookimpl
def qbench_register_device_profiles() -> list[DeviceProfile]:
    return list(BUILTIN_DEVICES)
