"""Stand-in for ComfyUI's folder_paths: the output directory is set by the tests."""

output_directory = None


def get_output_directory():
    return output_directory
