"""Python half of the akidb_ros package (the interfaces are built by CMakeLists.txt)."""
from glob import glob

from setuptools import find_packages, setup

package_name = 'akidb_ros'

setup(
    name=package_name,
    version='0.1.0',
    packages=find_packages(include=['akidb_ros', 'akidb_ros.*']),
    data_files=[
        ('share/ament_index/resource_index/packages', ['resource/' + package_name]),
        ('share/' + package_name, ['package.xml']),
        # ROS installs (ros2 launch / ros2 interface): launch files, node params, interfaces
        ('share/' + package_name + '/launch', glob('launch/*.launch.py') +
         glob('launch/*.launch.xml')),
        ('share/' + package_name + '/config', ['config/params.yaml', 'config/models.yaml',
                                               'config/fastdds_loopback.xml']),
        ('share/' + package_name + '/msg', glob('msg/*.msg')),
        ('share/' + package_name + '/srv', glob('srv/*.srv')),
    ],
    install_requires=['setuptools'],
    zip_safe=False,
    maintainer='akidb_ros team',
    maintainer_email='akidb-ros@example.com',
    description='Production text-embedding service for ROS 2 (node, REST and gRPC bridges).',
    license='Apache-2.0',
    entry_points={
        'console_scripts': [
            'embedding_node = akidb_ros.ros.node:main',
            'akidb-embed = akidb_ros.ros.cli:embed_main',
            'akidb-models = akidb_ros.ros.cli:models_main',
            'akidb-server = akidb_ros.server:main',
            'akidb-keys = akidb_ros.guard.keys_cli:main',
        ],
    },
)
