"""akidb_ros: a production text-embedding service for ROS 2.

The generated ROS interfaces (``akidb_ros.msg``, ``akidb_ros.srv``) are installed by
CMake into the venv's site-packages, while the Python code may run from the source tree
(editable install, tests). ``extend_path`` lets both halves of the package be found.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)  # noqa: F821 - module attribute of a package

__version__ = '0.1.0'
