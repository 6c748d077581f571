# cmake -DSRC=<python/leanformer> -DDST=<build>/python/leanformer -DLIB=<_C*.so> -DCONFIG=<json> -P this
# A fresh importable copy of the package with this build's extension. Compiled files of the source
# tree (an in-place _C*.so from `pip install -e .`, caches, its _build_config.json) are left out,
# so the copy can only load the extension built here.
foreach(var SRC DST LIB CONFIG)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "assemble_package.cmake: -D${var}=... is required")
  endif()
endforeach()
file(REMOVE_RECURSE "${DST}")
get_filename_component(parent "${DST}" DIRECTORY)
file(COPY "${SRC}" DESTINATION "${parent}"
     PATTERN "*.so" EXCLUDE
     PATTERN "__pycache__" EXCLUDE
     PATTERN "_build_config.json" EXCLUDE)
file(COPY "${LIB}" DESTINATION "${DST}")
file(COPY "${CONFIG}" DESTINATION "${DST}")
