"""Launch the frame recorder alone: synced lidar + camera frames into a FrameStore for pseudo-labelling.

    ros2 launch sal_ros record.launch.py record_dir:=frames [params_file:=my.yaml] [use_sim_time:=true]

DDS settings as in segment.launch.py.
"""
import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable
from launch.conditions import LaunchConfigurationNotEquals
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from ament_index_python.packages import get_package_share_directory


def generate_launch_description():
    share = get_package_share_directory("sal_ros")
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "record.yaml"),
                              description="ROS 2 params YAML (sections /** and sal_recorder)"),
        DeclareLaunchArgument("record_dir", default_value="sal_frames", description="FrameStore directory"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock (bag replay)"),
        DeclareLaunchArgument("log_level", default_value="info", description="debug, info, warn, error"),
        DeclareLaunchArgument("discovery_range", default_value="",
                              description="ROS_AUTOMATIC_DISCOVERY_RANGE for the node (LOCALHOST, SUBNET, ...); "
                                          "empty: as in the environment"),
        DeclareLaunchArgument("fastdds_profile", default_value="",
                              description="Fast DDS XML profile for the node, e.g. the installed "
                                          "config/fastdds.xml (loopback only); empty: as in the environment"),
        SetEnvironmentVariable("ROS_AUTOMATIC_DISCOVERY_RANGE", LaunchConfiguration("discovery_range"),
                               condition=LaunchConfigurationNotEquals("discovery_range", "")),
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", LaunchConfiguration("fastdds_profile"),
                               condition=LaunchConfigurationNotEquals("fastdds_profile", "")),
        Node(
            package="sal_ros",
            executable="recorder",
            name="sal_recorder",
            parameters=[LaunchConfiguration("params_file"),
                        {"use_sim_time": ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool),
                         "output_dir": LaunchConfiguration("record_dir")}],
            ros_arguments=["--log-level", LaunchConfiguration("log_level")],
            output="screen",
            emulate_tty=True,
        ),
    ])
