import { useEffect, useRef } from "preact/hooks";
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";

export interface SeriesStyle {
  label: string;
  stroke: string;
  points?: boolean; // drawn as points only (no line): reconstructed values
  dash?: number[];
}

/** A uPlot chart of `data` ([x, ...series]); redrawn in place when `data` changes. */
export function Chart(props: {
  title?: string;
  data: uPlot.AlignedData;
  series: SeriesStyle[];
  width?: number;
  height?: number;
  compact?: boolean;
  testid?: string;
}) {
  const host = useRef<HTMLDivElement>(null);
  const plot = useRef<uPlot | null>(null);
  const { compact = false } = props;

  useEffect(() => {
    if (!host.current) return;
    const options: uPlot.Options = {
      title: props.title,
      width: props.width ?? 320,
      height: props.height ?? 140,
      legend: { show: !compact },
      cursor: { show: !compact },
      axes: compact ? [{ show: false }, { show: false }] : [{}, { size: 45 }],
      series: [
        {},
        ...props.series.map((style) => ({
          label: style.label,
          stroke: style.stroke,
          dash: style.dash,
          width: style.points ? 0 : 1.5,
          spanGaps: false,
          points: style.points ? { show: true, size: 5, fill: style.stroke, stroke: style.stroke } : { show: false },
        })),
      ],
    };
    plot.current = new uPlot(options, props.data, host.current);
    return () => {
      plot.current?.destroy();
      plot.current = null;
    };
    // The chart is built once; its data changes below (setData).
  }, []);

  useEffect(() => {
    plot.current?.setData(props.data);
  }, [props.data]);

  return <div class="chart" ref={host} data-testid={props.testid} data-points={props.data[0]?.length ?? 0} />;
}
