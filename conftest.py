"""Repository-wide test configuration: pytester for the plugin's black-box tests."""

pytest_plugins = ["pytester"]
