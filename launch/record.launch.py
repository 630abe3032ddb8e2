"""Launch the frame recorder alone: synced lidar + camera frames into a FrameStore for pseudo-labelling.

    ros2 launch sal_ros record.launch.py record_dir:=frames [params_file:=my.yaml] [use_sim_time:=true]
                                         [managed:=true]

record_dir and use_sim_time win over the params file, its node-scoped ``sal_recorder:`` section included;
record_dir empty keeps the file's ``output_dir``. DDS settings as in segment.launch.py.
"""
import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, SetEnvironmentVariable
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from ament_index_python.packages import get_package_share_directory
from sal_ros.tools.launch_args import executable, node_overrides, when_given


def recorder(context):
    return [Node(
        package="sal_ros",
        executable=executable(context, "recorder"),  # or "recorder_managed" (managed:=true)
        name="sal_recorder",
        namespace="",  # the node's full name is known: its overrides are node-scoped (node_overrides)
        parameters=[LaunchConfiguration("params_file"), node_overrides(context, output_dir="record_dir")],
        ros_arguments=["--log-level", LaunchConfiguration("log_level")],
        output="screen",
        emulate_tty=True,
    )]


def generate_launch_description():
    share = get_package_share_directory("sal_ros")
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "record.yaml"),
                              description="ROS 2 params YAML (sections /** and sal_recorder)"),
        DeclareLaunchArgument("record_dir", default_value="",
                              description="FrameStore directory; empty: output_dir of the params file"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock (bag replay)"),
        DeclareLaunchArgument("log_level", default_value="info", description="debug, info, warn, error"),
        DeclareLaunchArgument("managed", default_value="false",
                              description="lifecycle nodes, unconfigured at start: ros2 lifecycle set configure, activate"),
        DeclareLaunchArgument("discovery_range", default_value="",
                              description="ROS_AUTOMATIC_DISCOVERY_RANGE for the node (LOCALHOST, SUBNET, ...); "
                                          "empty: as in the environment"),
        DeclareLaunchArgument("fastdds_profile", default_value="",
                              description="Fast DDS XML profile for the node, e.g. the installed "
                                          "config/fastdds.xml (loopback only); empty: as in the environment"),
        SetEnvironmentVariable("ROS_AUTOMATIC_DISCOVERY_RANGE", LaunchConfiguration("discovery_range"),
                               condition=when_given("discovery_range")),
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", LaunchConfiguration("fastdds_profile"),
                               condition=when_given("fastdds_profile")),
        OpaqueFunction(function=recorder),
    ])
