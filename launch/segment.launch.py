"""Launch the SAL segmenter (and optionally the frame recorder) with the shipped parameters.

    ros2 launch sal_ros segment.launch.py [params_file:=my.yaml] [record:=true record_dir:=frames]
                                          [use_sim_time:=true] [log_level:=info]

DDS: the nodes keep the environment's RMW_IMPLEMENTATION, ROS_AUTOMATIC_DISCOVERY_RANGE and Fast DDS profile, so
a lidar driver on another host stays visible. discovery_range:=LOCALHOST and fastdds_profile:=<path> set them for
these nodes only when given, e.g. the installed share/sal_ros/config/fastdds.xml (shared memory for large clouds,
UDP on loopback only).
"""
import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, IncludeLaunchDescription, SetEnvironmentVariable
from launch.conditions import IfCondition, LaunchConfigurationNotEquals
from launch.launch_description_sources import PythonLaunchDescriptionSource
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue

from ament_index_python.packages import get_package_share_directory

# Arguments handed to record.launch.py when record:=true.
RECORDER_ARGS = ("params_file", "record_dir", "use_sim_time", "log_level", "discovery_range", "fastdds_profile")


def generate_launch_description():
    share = get_package_share_directory("sal_ros")
    params_file = LaunchConfiguration("params_file")
    use_sim_time = ParameterValue(LaunchConfiguration("use_sim_time"), value_type=bool)
    log_args = ["--log-level", LaunchConfiguration("log_level")]
    return LaunchDescription([
        DeclareLaunchArgument("params_file", default_value=os.path.join(share, "config", "segment.yaml"),
                              description="ROS 2 params YAML (sections /**, sal_segmenter, sal_recorder)"),
        DeclareLaunchArgument("record", default_value="false", description="also run the frame recorder"),
        DeclareLaunchArgument("record_dir", default_value="sal_frames", description="recorder FrameStore directory"),
        DeclareLaunchArgument("use_sim_time", default_value="false", description="use /clock (bag replay)"),
        DeclareLaunchArgument("log_level", default_value="info", description="debug, info, warn, error"),
        DeclareLaunchArgument("discovery_range", default_value="",
                              description="ROS_AUTOMATIC_DISCOVERY_RANGE for the nodes (LOCALHOST, SUBNET, ...); "
                                          "empty: as in the environment"),
        DeclareLaunchArgument("fastdds_profile", default_value="",
                              description="Fast DDS XML profile for the nodes, e.g. the installed "
                                          "config/fastdds.xml (loopback only); empty: as in the environment"),
        SetEnvironmentVariable("ROS_AUTOMATIC_DISCOVERY_RANGE", LaunchConfiguration("discovery_range"),
                               condition=LaunchConfigurationNotEquals("discovery_range", "")),
        SetEnvironmentVariable("FASTDDS_DEFAULT_PROFILES_FILE", LaunchConfiguration("fastdds_profile"),
                               condition=LaunchConfigurationNotEquals("fastdds_profile", "")),
        Node(
            package="sal_ros",
            executable="segmenter",
            name="sal_segmenter",
            parameters=[params_file, {"use_sim_time": use_sim_time}],
            ros_arguments=log_args,
            output="screen",
            emulate_tty=True,
        ),
        # The recorder is record.launch.py itself (one definition of its node), given this launch's arguments.
        IncludeLaunchDescription(
            PythonLaunchDescriptionSource(os.path.join(share, "launch", "record.launch.py")),
            launch_arguments={name: LaunchConfiguration(name) for name in RECORDER_ARGS}.items(),
            condition=IfCondition(LaunchConfiguration("record")),
        ),
    ])
