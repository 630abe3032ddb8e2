"""Launch the frame recorder alone: synced lidar + camera frames into a FrameStore for pseudo-labelling.

    ros2 launch sal_ros record.launch.py record_dir:=frames [params_file:=my.yaml] [use_sim_time:=true]
                                         [managed:=true]

record_dir and use_sim_time win over the params file, its node-scoped ``sal_recorder:`` section included;
record_dir empty keeps the file's ``output_dir``. DDS settings as in segment.launch.py.
"""
import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction

from ament_index_python.packages import get_package_share_directory
from sal_ros.tools.launch_args import sensor_node, shared_arguments


def recorder(context):
    return sensor_node(context, "sal_recorder", "recorder", output_dir="record_dir")  # or recorder_managed


def generate_launch_description():
    share = get_package_share_directory("sal_ros")
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "record.yaml"),
                              description="ROS 2 params YAML (sections /** and sal_recorder)"),
        DeclareLaunchArgument("record_dir", default_value="",
                              description="FrameStore directory; empty: output_dir of the params file"),
        *shared_arguments("the node"),
        OpaqueFunction(function=recorder),
    ])
