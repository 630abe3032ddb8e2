import os
from glob import glob

from setuptools import find_packages, setup

package_name = "sal_ros"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
        ("share/" + package_name + "/config", [f for f in glob("config/*") if os.path.isfile(f)]),
        ("share/" + package_name + "/config/experiments", glob("config/experiments/*")),
    ],
    install_requires=["setuptools", "numpy", "scipy", "PyYAML", "transforms3d", "rosbags", "tqdm", "pillow"],
    zip_safe=True,
    maintainer="sal_ros developers",
    maintainer_email="sal-ros@example.com",
    description="SAL (Segment Anything in Lidar) for ROS 2: zero-shot lidar panoptic segmentation from text prompts",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "sal-ros = sal_ros.cli:main",
            "segmenter = sal_ros.tools.run:segmenter_main",
            "recorder = sal_ros.tools.run:recorder_main",
            "segmenter_managed = sal_ros.tools.run:segmenter_managed_main",
            "recorder_managed = sal_ros.tools.run:recorder_managed_main",
        ],
    },
)
