"""Build and install hv; the cffi extension in native/ is compiled here."""

from setuptools import find_packages, setup

setup(
    name="hv",
    version="0.1.0",
    description="Memory manager for QEMU/KVM VMs after VMware ESX Server (OSDI 2002)",
    packages=find_packages(include=["hv", "hv.*"]),
    package_data={"hv.ops": ["static/*.html", "static/*.js", "static/*.css"]},
    python_requires=">=3.11",
    setup_requires=["cffi>=1.15"],
    cffi_modules=["native/build_scanner.py:ffibuilder"],
    install_requires=["cffi>=1.15", "numpy>=1.24", "qemu.qmp>=0.0.3", "prometheus_client>=0.17"],
    extras_require={"test": ["pytest>=7", "pytest-timeout", "hypothesis", "xxhash>=3", "mypy"],
                    "plot": ["matplotlib"]},
    entry_points={"console_scripts": ["hv = hv.cli:main"]},
)
